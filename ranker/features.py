"""Feature extraction with a cache: run the encoder once over a catalog, train heads many times.

Decoding and encoding audio is by far the most expensive step (MERT: about 4 s of CPU per
30 s segment), while training a head on cached features takes minutes. So
:func:`embed_catalog` stores everything a head or the ablation could need, and training
never decodes audio again.

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

Runs are resumable (songs already stored are skipped), batched across songs (decoding in a
thread pool overlaps encoding the previous batch; the segments of a batch of songs go to
the encoder together) and never stopped by bad audio: a song that cannot be decoded or
encoded is recorded with its error code and reported.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from indexes.base import EmbeddingRecord
from indexes.segment_store import SegmentStore, SegmentStoreError
from indexes.sqlite_embeddings import SqliteEmbeddingStore
from ranker.catalog import read_catalog
from ranker.errors import ConfigError, ErrorCode, InputError

if TYPE_CHECKING:
    from ranker.audio import DecodedAudio
    from ranker.encoders.base import Encoder
    from ranker.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_FILE = "features.json"
EMBEDDINGS_FILE = "embeddings.sqlite"
SEGMENTS_FILE = "segments.sqlite"
FEATURES_FORMAT = "apexrank-features"
FEATURES_FORMAT_VERSION = 1
#: Songs decoded and encoded together; two batches of decoded audio are in memory at once.
DEFAULT_BATCH_SONGS = 16
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


def _manifest_for(encoder: Encoder, settings: Settings) -> dict[str, Any]:
    layers = list(settings.model.layers) if encoder.name == "mert" else None
    return {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_FORMAT_VERSION,
        "encoder": encoder.name,
        "encoder_id": encoder.encoder_id,
        "n_layers": int(encoder.n_layers),
        "dim": int(encoder.dim),
        "vector_dim": int(encoder.vector_dim),
        "layers": layers,
        "sample_rate": int(settings.audio.sample_rate),
        "segment_s": float(settings.audio.segment_s),
        "max_duration_s": float(settings.audio.max_duration_s),
        "created_at": datetime.now(UTC).isoformat(),
    }


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


def _check_or_write_manifest(out: Path, wanted: dict[str, Any]) -> None:
    path = out / MANIFEST_FILE
    if not path.exists():
        if (out / EMBEDDINGS_FILE).exists():
            # A store without a manifest: accept it only if it holds nothing of another encoder.
            with SqliteEmbeddingStore(out / EMBEDDINGS_FILE) as store:
                others = store.encoder_ids() - {wanted["encoder_id"]}
            if others:
                raise FeatureStoreError(
                    f"{out / EMBEDDINGS_FILE} holds features of encoder(s) {sorted(others)}, "
                    f"not {wanted['encoder_id']!r}; embed into a new directory"
                )
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
        return
    have = read_manifest(out)
    problems = [
        f"{key} {have.get(key)!r} (this run: {wanted[key]!r})"
        for key in ("encoder_id", "n_layers", "dim", "layers", "sample_rate", "segment_s")
        if have.get(key) != wanted[key]
    ]
    if problems:
        raise FeatureStoreError(
            f"{out} already holds features made differently: {'; '.join(problems)}. "
            "Features of different encoders or segmentations never mix: embed into another "
            "directory, or run with the encoder settings that made these."
        )


# --------------------------------------------------------------------------------------
# Embedding a catalog
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedFailure:
    """A song that could not be embedded: its catalog row, error code and message."""

    song_id: str
    row: int
    code: str
    message: str


@dataclass
class EmbedReport:
    """What one :func:`embed_catalog` run did."""

    out_dir: Path
    encoder_id: str
    total: int
    embedded: int = 0
    skipped_existing: int = 0
    failures: list[EmbedFailure] = field(default_factory=list)
    segments: int = 0
    audio_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def songs_per_s(self) -> float:
        return self.embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def failures_by_code(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.failures:
            counts[f.code] = counts.get(f.code, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        """One line for logs and the CLI."""
        codes = ", ".join(f"{c}: {n}" for c, n in self.failures_by_code().items())
        rate = f"{self.songs_per_s:.1f} songs/s, {self.audio_s / max(self.elapsed_s, 1e-9):.0f}x real time"
        return (
            f"{self.total} songs: {self.embedded} embedded, {self.skipped_existing} already stored, "
            f"{self.failed} failed{f' ({codes})' if codes else ''}; {self.segments} segments in "
            f"{self.elapsed_s:.1f} s ({rate}) with {self.encoder_id} into {self.out_dir}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "encoder_id": self.encoder_id,
            "total": self.total,
            "embedded": self.embedded,
            "skipped_existing": self.skipped_existing,
            "failed": self.failed,
            "failures": [f.__dict__ for f in self.failures],
            "segments": self.segments,
            "audio_s": self.audio_s,
            "elapsed_s": self.elapsed_s,
        }


@dataclass
class _Song:
    row: int
    song_id: str
    uri: str
    audio: DecodedAudio | None = None
    error: tuple[str, str] | None = None


def _load(song: _Song, settings: Settings) -> _Song:
    from ranker.audio import load_song

    try:
        song.audio = load_song(song.uri, settings.audio)
    except InputError as exc:
        song.error = (str(exc.code), exc.message)
    except Exception as exc:  # a decoder bug must not stop a long run: record it
        song.error = (str(ErrorCode.INTERNAL_ERROR), f"unexpected {type(exc).__name__}: {exc}")
    return song


def embed_catalog(
    catalog_path: str | Path,
    out_dir: str | Path,
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    batch_songs: int = DEFAULT_BATCH_SONGS,
    progress: bool = True,
    decode_threads: int | None = None,
) -> EmbedReport:
    """Embed every song of a catalog not yet stored in ``out_dir``; see the module docstring.

    ``encoder`` defaults to ``build_encoder(settings)``. Raises :class:`~ranker.catalog.CatalogError`
    for an unusable catalog and :class:`FeatureStoreError` when ``out_dir`` holds features of
    another encoder; bad audio only ends up in the report's ``failures``.
    """
    if batch_songs < 1:
        raise ValueError("batch_songs must be >= 1")
    tqdm: Any = importlib.import_module("tqdm").tqdm  # typed as Any: no stubs needed

    from ranker.audio import segment_waveform

    began = time.perf_counter()
    catalog = read_catalog(catalog_path)
    if encoder is None:
        from ranker.encoders import build_encoder

        encoder = build_encoder(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out, _manifest_for(encoder, settings))

    ids = catalog.song_ids
    uris = [str(u) if u is not None else "" for u in catalog.table.column("audio_uri").to_pylist()]
    report = EmbedReport(out_dir=out, encoder_id=encoder.encoder_id, total=len(ids))
    threads = decode_threads or settings.worker.fetch_threads
    with (
        SqliteEmbeddingStore(out / EMBEDDINGS_FILE) as store,
        _segment_store(out / SEGMENTS_FILE) as segstore,
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool,
    ):
        done = store.contains(ids)
        todo = [_Song(i, sid, uris[i]) for i, sid in enumerate(ids) if sid not in done]
        report.skipped_existing = len(ids) - len(todo)
        batches = [todo[i : i + batch_songs] for i in range(0, len(todo), batch_songs)]
        bar = tqdm(total=len(todo), unit="song", desc="embed", disable=not progress, dynamic_ncols=True)

        def submit(batch: list[_Song]) -> list[Future[_Song]]:
            return [pool.submit(_load, s, settings) for s in batch]

        try:
            pending = submit(batches[0]) if batches else []
            for k in range(len(batches)):
                songs = [f.result() for f in pending]
                # Decode the next batch while this one is encoded.
                pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
                _embed_batch(songs, encoder, settings, store, segstore, report, segment_waveform)
                for s in songs:
                    s.audio = None  # free the waveform now, not when the batch list goes
                bar.update(len(songs))
                bar.set_postfix(embedded=report.embedded, failed=report.failed)
        finally:
            bar.close()
    report.elapsed_s = time.perf_counter() - began
    log.info("embed: %s", report.summary())
    return report


def _embed_batch(
    songs: list[_Song],
    encoder: Encoder,
    settings: Settings,
    store: SqliteEmbeddingStore,
    segstore: SegmentStore,
    report: EmbedReport,
    segment_waveform: Callable[[np.ndarray, int, float], list[np.ndarray]],
) -> None:
    failures: list[EmbedFailure] = []
    ready: list[tuple[_Song, list[np.ndarray]]] = []
    for s in songs:
        if s.error is not None or s.audio is None:
            code, message = s.error or (str(ErrorCode.INTERNAL_ERROR), "no audio")
            failures.append(EmbedFailure(s.song_id, s.row, code, message))
            continue
        segs = segment_waveform(s.audio.waveform, s.audio.sample_rate, settings.audio.segment_s)
        ready.append((s, segs))

    # The worker's encoding path, so that offline features equal what the worker stores.
    from ranker.scoring import encode_songs

    encoded = encode_songs(encoder, [segs for _, segs in ready]) if ready else []
    seg_rows: list[tuple[str, np.ndarray, np.ndarray]] = []
    records: list[EmbeddingRecord] = []
    for (s, segs), e in zip(ready, encoded, strict=True):
        if e.layers is None or e.vector is None or e.features is None or e.frames is None:
            # Unlike the worker's dead letters, the failure record may name the exception in full.
            message = f"encoder failed: {e.exception!r}" if e.exception is not None else str(e.error)
            failures.append(EmbedFailure(s.song_id, s.row, str(ErrorCode.INTERNAL_ERROR), message))
            continue
        seg_rows.append((s.song_id, e.features, e.frames))
        records.append(
            EmbeddingRecord(
                song_id=s.song_id,
                encoder_id=encoder.encoder_id,
                layers=e.layers,
                vector=e.vector,
                n_segments=e.n_segments,
                n_frames=e.n_frames,
            )
        )
        report.segments += len(segs)
        assert s.audio is not None
        report.audio_s += s.audio.scored_duration_s
    # Segments first: the song record is the "done" marker a resumed run looks for.
    segstore.put(encoder.encoder_id, seg_rows, failures)
    if records:
        store.put_many(records)
    report.embedded += len(records)
    report.failures.extend(sorted(failures, key=lambda f: f.row))
    for fail in failures:
        log.warning("embed: skipped %s (row %d): %s: %s", fail.song_id, fail.row, fail.code, fail.message)


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
