"""One scoring path: segments -> song embeddings -> head scores -> score-store records.

The scoring worker, ``apexrank embed`` and the retrain job's rescoring of the cold-start
window all turn audio or stored embeddings into the same things. Each step lives here
once, so a song gets the same embedding and the same record whichever path scored it:

* :func:`encode_songs`: the segments of many songs through the encoder in one batch
  (one song at a time when the batch fails, so a poison song fails alone), pooled per
  song and L2-normalised for the similarity index; a device out of memory is told apart
  (:attr:`EncodedSong.out_of_memory`): it passes, so the worker tries the song again later;
  a device that failed for good (:func:`is_device_fault`) raises :class:`~ranker.errors.DeviceFault`:
  no song is at fault, and the process must restart;
* :func:`score_songs` (:func:`score_predictions` for outputs already at hand): head outputs
  to scores, the cold-start ``rank_score`` and the model's prior like rate, computed once and
  carried to the record, with what the model knows of their reliability where it has it (an
  ensemble's spread per task and of the prior like rate, the out-of-distribution percentile
  and flag: issue 17);
* :func:`load_current_model`: the promoted head for an encoder *spec*, so a job that only
  rescores stored embeddings never loads the encoder's weights.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from indexes.base import SongRecord
from indexes.redis_schema import OOD_FLAG, OOD_PERCENTILE, PRIOR_SD_FIELD, SPREAD_FIELD_PREFIX, UNTRAINED
from ranker.encoders.base import Encoder, EncoderSpec, pool_song
from ranker.errors import DeviceFault
from ranker.events import TASKS, SongScored
from ranker.model.artifact import Prediction, ScoringModel
from ranker.model.registry import load_or_init
from ranker.serving.state import PRIOR_FIELD, cold_start_quality, model_like_rate

if TYPE_CHECKING:
    from ranker.audio import DecodedAudio
    from ranker.settings import Settings

log = logging.getLogger(__name__)

#: The failure of a song whose features contain NaN or infinity (it cannot be scored).
NON_FINITE = "encoder produced non-finite features"
#: Where a popularity-only head leaves the aesthetic scores: the middle of their 1..5 scale.
AESTHETIC_MIDPOINT = 3.0

# -- encoding -------------------------------------------------------------------------------


@dataclass
class EncodedSong:
    """One song's encoder output, or why there is none (``error`` set, ``layers`` None).

    ``features``/``frames`` are the per-segment outputs (views into the batch's arrays),
    kept for callers that store them (``apexrank embed``'s segment store).
    """

    n_segments: int
    n_frames: int = 0
    features: np.ndarray | None = None  # (S, n_layers, dim) float32
    frames: np.ndarray | None = None  # (S,) int64
    layers: np.ndarray | None = None  # (n_layers, dim): frame-weighted mean over the segments
    vector: np.ndarray | None = None  # (vector_dim,): encoder.song_vector, L2-normalised
    error: str | None = None
    exception: BaseException | None = None  # the encoder's, when it raised

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def out_of_memory(self) -> bool:
        """The encoder ran out of device memory: the song itself may be fine, and encode later."""
        return self.exception is not None and is_out_of_memory(self.exception)


# Device memory failures torch raises as a plain RuntimeError or an AcceleratorError (cuBLAS and cuDNN
# allocate their workspaces outside the caching allocator): transient, like torch.OutOfMemoryError.
_OUT_OF_MEMORY = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
    r"|MPS backend out of memory"
)
# Older torch raises a sticky CUDA error as a plain RuntimeError; only its message says so.
_DEVICE_ERROR = re.compile(r"CUDA error|CUDA driver error|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error|device-side assert")


def is_out_of_memory(exc: BaseException) -> bool:
    """``exc`` says the device had no memory for the encode: a smaller or later one may pass."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc)) is not None


def is_device_fault(exc: BaseException) -> bool:
    """``exc`` is the device failing, not the input: an illegal memory access, a device-side assert or an
    ECC fault leaves the CUDA context unusable, so every later call fails too (memory aside: transient)."""
    if isinstance(exc, DeviceFault):
        return True
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    return isinstance(exc, torch.AcceleratorError) or _DEVICE_ERROR.search(str(exc)) is not None


def song_vector(encoder: Encoder, layers: np.ndarray) -> np.ndarray:
    """The song's similarity-index vector: ``encoder.song_vector`` scaled to unit length."""
    vec = encoder.song_vector(layers).astype(np.float32)
    vec /= max(float(np.linalg.norm(vec)), 1e-12)
    return vec


def encode_songs(encoder: Encoder, songs: Sequence[Sequence[np.ndarray]]) -> list[EncodedSong]:
    """Encode the segments of every song together, then pool each song over its real frames.

    Batching across songs keeps the encoder's batches full. If the batch raises, every
    song is encoded again on its own: one bad song must not fail its batch mates, so only
    the songs that still raise get an error (``encoder failed: <type>``; the exception is
    kept). After a device out of memory the allocator's cache is freed first, and a song
    that still runs out is marked :attr:`EncodedSong.out_of_memory`. A device fault
    (:func:`is_device_fault`) raises :class:`~ranker.errors.DeviceFault` at once: every
    song would fail alike, through no fault of its own. A song whose features are not
    finite gets :data:`NON_FINITE`. Returns one :class:`EncodedSong` per input song, in order.
    """
    segments = [seg for segs in songs for seg in segs]
    try:
        feats, frames = encoder.encode(segments)
    except Exception as exc:
        _raise_device_fault(exc)
        log.exception("encoding %d songs together failed; retrying one song at a time", len(songs))
        _free_device_memory(exc)
        return [_encode_alone(encoder, segs) for segs in songs]
    out: list[EncodedSong] = []
    start = 0
    for segs in songs:
        end = start + len(segs)
        out.append(_pooled(encoder, feats[start:end], frames[start:end]))
        start = end
    return out


def _encode_alone(encoder: Encoder, segments: Sequence[np.ndarray]) -> EncodedSong:
    try:
        feats, frames = encoder.encode(segments)
    except Exception as exc:
        _raise_device_fault(exc)
        _free_device_memory(exc)
        # The type only: a message or repr may carry heap addresses or data into dead letters.
        return EncodedSong(len(segments), error=f"encoder failed: {type(exc).__name__}", exception=exc)
    return _pooled(encoder, feats, frames)


def _free_device_memory(exc: BaseException) -> None:
    """After a device out of memory, let go of what the failed encode held, so that the next,
    smaller one has room: its frames' tensors (the exception is kept, and logged, with them
    otherwise) and the allocator's cached blocks."""
    if not is_out_of_memory(exc):
        return
    traceback.clear_frames(exc.__traceback__)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _raise_device_fault(exc: Exception) -> None:
    if is_device_fault(exc):
        raise DeviceFault(f"the encoder's device failed: {type(exc).__name__}: {exc}") from exc


def _pooled(encoder: Encoder, feats: np.ndarray, frames: np.ndarray) -> EncodedSong:
    song = EncodedSong(len(feats), int(np.asarray(frames).sum()), feats, frames)
    if not np.isfinite(feats).all():
        song.error = NON_FINITE
        return song
    layers = pool_song(feats, frames)
    if not np.isfinite(layers).all():
        song.error = NON_FINITE
        return song
    song.layers, song.vector = layers, song_vector(encoder, layers)
    return song


# -- scoring --------------------------------------------------------------------------------


class SongMeta(NamedTuple):
    """What scoring needs of a song besides its features (the like-rate cohort is generator x week)."""

    song_id: str
    generator: str
    created_at: str  # RFC 3339, exactly as stored in the song's record


@dataclass(frozen=True)
class SongScore:
    """A song scored by one model: what ``songs.scored`` and the song's record carry."""

    song_id: str
    model_version: str
    generator: str
    created_at: str
    scores: dict[str, float]  # every task of TASKS
    rank_score: float  # the default feed's quality of the song unplayed (uncalibrated)
    like_rate: float | None  # the model's prior like rate; None when the model has no target transform
    trained: bool = True  # False: an untrained, seeded head (model.allow_untrained) made these scores
    spread: dict[str, float] | None = None  # an ensemble's sd over its heads, per task of the model
    like_rate_sd: float | None = None  # an ensemble's sd of the prior like rate (with a target transform)
    ood_percentile: float | None = None  # 0-100 against held-out training songs (a model with an OOD model)
    ood: bool | None = None  # ood_percentile above model.ood_flag_percentile

    def uncertainty(self) -> dict[str, Any]:
        """The uncertainty fields of the song's record (redis_schema), only those the model gave."""
        fields: dict[str, Any] = {}
        if self.like_rate_sd is not None:
            fields[PRIOR_SD_FIELD] = self.like_rate_sd
        for task, sd in (self.spread or {}).items():
            fields[SPREAD_FIELD_PREFIX + task] = sd
        if self.ood_percentile is not None:
            fields[OOD_PERCENTILE] = self.ood_percentile
            fields[OOD_FLAG] = int(bool(self.ood))
        return fields

    def record(self, scored_at: str, extra: Mapping[str, Any] | None = None) -> SongRecord:
        """The score-store record; the prior like rate goes in ``extra`` under ``PRIOR_FIELD``, and
        an untrained head's scores are marked (``UNTRAINED``) so that no reader mistakes them."""
        fields = dict(extra or {})
        if self.like_rate is not None:
            fields[PRIOR_FIELD] = self.like_rate
        fields.update(self.uncertainty())
        if not self.trained:
            fields[UNTRAINED] = 1
        return SongRecord(
            song_id=self.song_id,
            model_version=self.model_version,
            scores={t: self.scores[t] for t in TASKS},
            rank_score=self.rank_score,
            generator=self.generator,
            created_at=self.created_at,
            scored_at=scored_at,
            extra=fields,
        )

    def event(self, scored_at: datetime, *, truncated: bool = False) -> SongScored:
        """The ``songs.scored`` event: version 2 when it carries an uncertainty field, else version 1."""
        extra: dict[str, Any] = {}
        if self.spread is not None:
            extra["spread"] = dict(self.spread)
        if self.like_rate_sd is not None:
            extra["like_rate_sd"] = self.like_rate_sd
        if self.ood_percentile is not None:
            extra["ood_percentile"] = self.ood_percentile
            extra["ood"] = bool(self.ood)
        return SongScored(
            schema_version=2 if extra else 1,
            song_id=self.song_id,
            model_version=self.model_version,
            rank_score=self.rank_score,
            scored_at=scored_at,
            generator=self.generator,
            truncated=truncated,
            untrained=not self.trained,
            **self.scores,
            **extra,
        )


def score_songs(
    settings: Settings, model: ScoringModel, layers: np.ndarray, songs: Sequence[SongMeta]
) -> list[SongScore]:
    """Songs' pooled layers (B, n_layers, dim) -> their :class:`SongScore` s, uncertainty included."""
    return score_predictions(settings, model, model.predict_full(layers), songs)


def score_predictions(
    settings: Settings, model: ScoringModel, predictions: np.ndarray | Prediction, songs: Sequence[SongMeta]
) -> list[SongScore]:
    """Row ``i`` of ``model.predict(...)`` (or of ``model.predict_full(...)``) for ``songs[i]`` -> its
    :class:`SongScore`.

    The like-rate prior is computed here once: the rank score uses it, and the record
    carries it, so the feeds read the very rate the rank score was computed with. From a
    :class:`Prediction`, the ensemble's spread per task and of the prior like rate (each
    member's scores through the same read-out, then the sd over members) and the OOD
    percentile and flag come along; a bare array carries none of them.
    """
    full = predictions if isinstance(predictions, Prediction) else Prediction(np.asarray(predictions))
    transform = model.target_transform
    threshold = settings.model.ood_flag_percentile
    out: list[SongScore] = []
    for i, (song, row) in enumerate(zip(songs, full.mean, strict=True)):
        scores = _all_tasks(model, row)
        rate = model_like_rate(transform, scores, song.generator, song.created_at)
        spread = rate_sd = pct = None
        if full.spread is not None and full.members is not None:
            spread = {task: float(v) for task, v in zip(model.tasks, full.spread[i], strict=True)}
            rates = [
                model_like_rate(transform, _all_tasks(model, m[i]), song.generator, song.created_at)
                for m in full.members
            ]
            rate_sd = float(np.std([r for r in rates if r is not None])) if rate is not None else None
        if full.ood_percentile is not None:
            pct = float(full.ood_percentile[i])
        out.append(
            SongScore(
                song_id=song.song_id,
                model_version=model.version,
                generator=song.generator,
                created_at=song.created_at,
                scores=scores,
                rank_score=cold_start_quality(settings, scores, rate),
                like_rate=rate,
                trained=model.trained,
                spread=spread,
                like_rate_sd=rate_sd,
                ood_percentile=pct,
                ood=None if pct is None else pct > threshold,
            )
        )
    return out


def _all_tasks(model: ScoringModel, row: np.ndarray) -> dict[str, float]:
    """One row of scores by task; a popularity-only head leaves aesthetics at the scale's midpoint."""
    scores = {task: float(v) for task, v in zip(model.tasks, row, strict=True)}
    for task in TASKS:
        scores.setdefault(task, AESTHETIC_MIDPOINT)
    return scores


def audio_extra(
    n_segments: int, audio: DecodedAudio | None, title: str | None = None, tags: Sequence[str] = ()
) -> dict[str, Any]:
    """The record's descriptive fields of a song scored from its audio (``audio`` None: reused embedding)."""
    extra: dict[str, Any] = {"n_segments": n_segments}
    if audio is not None:
        extra["duration_s"] = round(audio.duration_s, 3)
        extra["truncated"] = int(audio.truncated)
        if audio.truncated:
            extra["scored_duration_s"] = round(audio.scored_duration_s, 3)
    if title:
        extra["title"] = title
    if tags:
        extra["tags"] = ",".join(tags)
    return extra


# -- the current model ----------------------------------------------------------------------


def load_current_model(settings: Settings, spec: EncoderSpec) -> ScoringModel:
    """The head ``settings.head_dir`` designates (or the seeded one) for the encoder ``spec`` describes.

    Takes a spec, not an encoder: the worker passes its encoder's, the retrain job
    ``encoder_spec(settings)``, which loads no weights. On ``settings.model.device``.
    """
    return load_or_init(
        settings.head_dir,
        input_dim=spec.dim,
        encoder_id=spec.encoder_id,
        seed=settings.model.seed,
        n_layers=spec.n_layers,
        layers=spec.layers,
        device=settings.model.device,
    )
