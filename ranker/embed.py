"""``apexrank embed``: run the encoder once over a catalog and store its features for training.

The features directory's layout, its manifest and the loading of feature sets for training
are :mod:`ranker.features`; this module writes such a directory. The two are apart because
training only reads features: it never runs the encoder or decodes audio.

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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexes.base import EmbeddingRecord
from indexes.segment_store import SegmentStore
from indexes.sqlite_embeddings import SqliteEmbeddingStore
from ranker.catalog import read_catalog
from ranker.errors import ErrorCode, InputError
from ranker.features import (
    EMBEDDINGS_FILE,
    FEATURES_FORMAT,
    FEATURES_FORMAT_VERSION,
    MANIFEST_FILE,
    SEGMENTS_FILE,
    FeatureStoreError,
    _segment_store,
    read_manifest,
)

if TYPE_CHECKING:
    from ranker.audio import DecodedAudio
    from ranker.encoders.base import Encoder
    from ranker.settings import Settings

log = logging.getLogger(__name__)

#: Songs decoded and encoded together; two batches of decoded audio are in memory at once.
DEFAULT_BATCH_SONGS = 16


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
