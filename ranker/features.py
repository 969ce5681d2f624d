"""Feature sets for training: the features directories that ``apexrank embed`` writes, read back.

Decoding and encoding audio is by far the most expensive step (MERT: about 4 s of CPU per
30 s segment), while training a head on cached features takes minutes. So
:func:`ranker.embed.embed_catalog` stores everything a head or the ablation could need, and
training never decodes audio again. This module holds the directory's format and reads it
(:func:`load_features`); writing it is :mod:`ranker.embed`, kept apart because training and
evaluation only ever read features.

A features directory holds

- ``features.json``: the manifest (format, encoder id, ``n_layers``, ``dim``, the encoder
  layers, sample rate and segment length). Features of different encoders never mix: a
  second run with another encoder (or another segment length) into the same directory is
  a :class:`FeatureStoreError`.
- ``embeddings.sqlite``: one record per song in the project's durable
  :class:`~indexes.sqlite_embeddings.SqliteEmbeddingStore` (the same records the scoring
  worker writes): the frame-weighted mean of the segments' pooled layers ``(n_layers, dim)``,
  the L2-normalised ``encoder.song_vector``, the segment and frame counts. A song is *done*
  once it is here; this record is written last.
- ``segments.sqlite``: per song, every segment's pooled layers (the ablation's "segment"
  input mode trains on them) and the failures of the last attempts, in an
  :class:`~indexes.segment_store.SegmentStore`. Layout (one row per song, so that loading
  100k songs is 100k rows, not millions)::

      segments(song_id TEXT PRIMARY KEY, encoder_id TEXT, n_segments INT, n_layers INT,
               dim INT, frames BLOB  -- little-endian int64, (n_segments,)
               features BLOB)        -- little-endian float32, (n_segments, n_layers, dim), C order
      failures(song_id TEXT PRIMARY KEY, code TEXT, message TEXT, failed_at REAL)
      meta(name TEXT PRIMARY KEY, value TEXT)   -- schema_version

  Both files use WAL with ``synchronous=FULL``; the segment row is committed before the
  song record, so a crash between the two only makes the next run redo that song.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexes.segment_store import SegmentStore, SegmentStoreError
from indexes.sqlite_embeddings import SqliteEmbeddingStore
from ranker.errors import ConfigError

MANIFEST_FILE = "features.json"
EMBEDDINGS_FILE = "embeddings.sqlite"
SEGMENTS_FILE = "segments.sqlite"
FEATURES_FORMAT = "apexrank-features"
FEATURES_FORMAT_VERSION = 1
_MAX_NAMED = 10


class FeatureStoreError(ConfigError):
    """A features directory is missing, belongs to another encoder, or lacks what was asked for."""


def _segment_store(path: Path) -> SegmentStore:
    """The segment store at ``path`` (:mod:`indexes.segment_store`); one this code cannot read
    is a :class:`FeatureStoreError`."""
    try:
        return SegmentStore(path)
    except SegmentStoreError as exc:
        raise FeatureStoreError(str(exc)) from exc


# --------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The ``features.json`` of a features directory, validated."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FeatureStoreError(
            f"{Path(directory)} holds no features ({MANIFEST_FILE} is missing); "
            "run `apexrank embed --catalog CATALOG --out DIR` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatureStoreError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FEATURES_FORMAT:
        raise FeatureStoreError(f"{path} is not an apexrank features manifest")
    if data.get("format_version") != FEATURES_FORMAT_VERSION:
        raise FeatureStoreError(
            f"{path} has format version {data.get('format_version')}, this code reads {FEATURES_FORMAT_VERSION}"
        )
    for key in ("encoder_id", "n_layers", "dim"):
        if key not in data:
            raise FeatureStoreError(f"{path} lacks {key!r}")
    return data


# --------------------------------------------------------------------------------------
# Loading features
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentFeatures:
    """Every segment of a :class:`FeatureSet`'s songs, flattened: row ``i`` belongs to song ``song_index[i]``."""

    features: npt.NDArray[np.float32]  # (M, L, D)
    frames: npt.NDArray[np.int64]  # (M,)
    song_index: npt.NDArray[np.int64]  # (M,) index into FeatureSet.song_ids

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class FeatureSet:
    """Song-level pooled layers of many songs, with their segment features on demand.

    ``layers[i]`` belongs to ``song_ids[i]``. ``failed`` maps songs whose embedding failed to
    their error code (so that training can skip them knowingly instead of calling them unknown).
    """

    song_ids: list[str]
    layers: npt.NDArray[np.float32]  # (N, L, D)
    n_segments: npt.NDArray[np.int64]  # (N,)
    encoder_id: str
    n_frames: npt.NDArray[np.int64] | None = None
    layer_indices: tuple[int, ...] | None = None
    failed: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    _segments: SegmentFeatures | None = field(default=None, repr=False)
    _segment_loader: Callable[[list[str]], SegmentFeatures] | None = field(default=None, repr=False)
    _index: dict[str, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.layers = np.asarray(self.layers, dtype=np.float32)
        self.n_segments = np.asarray(self.n_segments, dtype=np.int64)
        if self.layers.ndim != 3 or self.layers.shape[0] != len(self.song_ids):
            raise ValueError(f"layers must be (n_songs={len(self.song_ids)}, n_layers, dim), got {self.layers.shape}")
        if self.n_segments.shape != (len(self.song_ids),):
            raise ValueError("n_segments must have one entry per song")
        if len(set(self.song_ids)) != len(self.song_ids):
            raise ValueError("song_ids must be unique")

    def __len__(self) -> int:
        return len(self.song_ids)

    @property
    def n_layers(self) -> int:
        return int(self.layers.shape[1])

    @property
    def dim(self) -> int:
        return int(self.layers.shape[2])

    @property
    def has_segments(self) -> bool:
        return self._segments is not None or self._segment_loader is not None

    def index(self) -> dict[str, int]:
        """``{song_id: row}``."""
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.song_ids)}
        return self._index

    def segments(self) -> SegmentFeatures:
        """The per-segment features of these songs (loaded once, then kept)."""
        if self._segments is None:
            if self._segment_loader is None:
                raise FeatureStoreError(
                    "these features carry no per-segment features (segment input mode needs them: "
                    "embed with `apexrank embed`)"
                )
            self._segments = self._segment_loader(self.song_ids)
        return self._segments

    def subset(self, rows: npt.ArrayLike) -> FeatureSet:
        """The songs at ``rows`` (in that order), segments included when loaded or loadable."""
        idx = np.asarray(rows, dtype=np.int64)
        ids = [self.song_ids[i] for i in idx.tolist()]
        segments: SegmentFeatures | None = None
        if self._segments is not None:
            segments = _subset_segments(self._segments, idx, len(self.song_ids))
        return FeatureSet(
            song_ids=ids,
            layers=self.layers[idx],
            n_segments=self.n_segments[idx],
            encoder_id=self.encoder_id,
            n_frames=self.n_frames[idx] if self.n_frames is not None else None,
            layer_indices=self.layer_indices,
            failed=self.failed,
            directory=self.directory,
            _segments=segments,
            _segment_loader=self._segment_loader if segments is None else None,
        )


def _subset_segments(seg: SegmentFeatures, rows: np.ndarray, n_songs: int) -> SegmentFeatures:
    new_pos = np.full(n_songs, -1, dtype=np.int64)
    new_pos[rows] = np.arange(len(rows))
    order = np.argsort(seg.song_index, kind="stable")
    starts = np.searchsorted(seg.song_index[order], rows, side="left")
    ends = np.searchsorted(seg.song_index[order], rows, side="right")
    picks = np.concatenate([order[a:b] for a, b in zip(starts, ends, strict=True)]) if len(rows) else order[:0]
    return SegmentFeatures(
        features=seg.features[picks], frames=seg.frames[picks], song_index=new_pos[seg.song_index[picks]]
    )


def _segment_loader(path: Path) -> Callable[[list[str]], SegmentFeatures]:
    def load(song_ids: list[str]) -> SegmentFeatures:
        if not path.is_file():
            raise FeatureStoreError(f"{path} does not exist: these features have no per-segment features")
        with _segment_store(path) as store:
            got = store.get_many(song_ids)
        missing = [s for s in song_ids if s not in got]
        if missing:
            raise FeatureStoreError(
                f"{path} lacks the segment features of {len(missing)} songs "
                f"(e.g. {missing[:_MAX_NAMED]}); re-run `apexrank embed` into this directory"
            )
        feats = [got[s][0] for s in song_ids]
        frames = [got[s][1] for s in song_ids]
        counts = np.array([len(f) for f in feats], dtype=np.int64)
        return SegmentFeatures(
            features=np.concatenate(feats).astype(np.float32, copy=False),
            frames=np.concatenate(frames).astype(np.int64, copy=False),
            song_index=np.repeat(np.arange(len(song_ids), dtype=np.int64), counts),
        )

    return load


def load_features(directory: str | Path, song_ids: Sequence[str] | None = None) -> FeatureSet:
    """The features stored in ``directory``: all songs (sorted by id) or ``song_ids`` in that order.

    Asking for a song that is not stored is a :class:`FeatureStoreError` naming it.
    Segment features are read only when :meth:`FeatureSet.segments` is first called.
    """
    out = Path(directory)
    manifest = read_manifest(out)
    encoder_id = str(manifest["encoder_id"])
    db_path = out / EMBEDDINGS_FILE
    if not db_path.is_file():
        raise FeatureStoreError(f"{db_path} does not exist; run `apexrank embed` first")
    with SqliteEmbeddingStore(db_path) as store:
        if song_ids is None:
            records = {r.record.song_id: r.record for r in store.iter_since(0)}
            ids = sorted(records)
        else:
            ids = list(song_ids)
            records = {k: v.record for k, v in store.get_many(ids).items()}
            missing = [s for s in ids if s not in records]
            if missing:
                raise FeatureStoreError(
                    f"{out} has no features for {len(missing)} of the {len(ids)} songs asked for "
                    f"(e.g. {missing[:_MAX_NAMED]})"
                )
    foreign = sorted({records[s].encoder_id for s in ids} - {encoder_id})
    if foreign:
        raise FeatureStoreError(f"{db_path} mixes encoders {foreign} with {encoder_id!r} (its manifest)")
    n_layers, dim = int(manifest["n_layers"]), int(manifest["dim"])
    layers = np.empty((len(ids), n_layers, dim), dtype=np.float32)
    for i, s in enumerate(ids):
        layers[i] = records[s].layers
    failed: dict[str, str] = {}
    seg_path = out / SEGMENTS_FILE
    if seg_path.is_file():
        with _segment_store(seg_path) as segstore:
            failed = {k: v[0] for k, v in segstore.failures().items() if k not in records}
    raw_layers = manifest.get("layers")
    return FeatureSet(
        song_ids=ids,
        layers=layers,
        n_segments=np.array([records[s].n_segments for s in ids], dtype=np.int64),
        n_frames=np.array([records[s].n_frames for s in ids], dtype=np.int64),
        encoder_id=encoder_id,
        layer_indices=tuple(int(x) for x in raw_layers) if raw_layers else None,
        failed=failed,
        directory=out,
        _segment_loader=_segment_loader(seg_path),
    )
