"""The worker's embedding index: the durable store, the FAISS index over it, snapshots and recovery.

Write path: :meth:`EmbeddingIndex.add` commits records to SQLite first
(durable), then upserts into FAISS only the records whose sequence number is
new, then maybe writes a snapshot. The snapshot is a cache of the store: its
metadata names the last store sequence number it contains (the watermark), so
opening the directory loads the snapshot and replays only what came after it.
A crash between a store write and a snapshot therefore loses nothing (the store
has it) and duplicates nothing (replays are upserts by key).

A deletion (takedown, retention: :meth:`EmbeddingIndex.delete`) is a store write too: the store
records it under the next sequence number, and the index (this one at once, every reader as it
catches up) removes the key. Deletion records older than a horizon are pruned
(:meth:`EmbeddingIndex.prune_deletions`) once this index's snapshot on disk covers them.

The directory layout, the snapshot files and the checks a snapshot must pass are
:mod:`indexes.snapshots`' (shared with the API's read-only
:class:`~indexes.index_reader.IndexReader`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from indexes import snapshots
from indexes.base import EmbeddingRecord, RemovedEmbedding, StoredEmbedding, faiss_id
from indexes.faiss_config import AUTO, FaissIndexConfig
from indexes.faiss_index import FaissVectorIndex
from indexes.snapshots import INDEX_FILE, LOCK_FILE, META_FILE, META_FORMAT, STORE_FILE, SnapshotError
from indexes.sqlite_embeddings import SqliteEmbeddingStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_FILE",
    "LOCK_FILE",
    "META_FILE",
    "META_FORMAT",
    "STORE_FILE",
    "EmbeddingIndex",
    "OpenReport",
    "SnapshotError",
]


@dataclass(frozen=True)
class OpenReport:
    """How the index came up: from a snapshot plus replay, or rebuilt from the store (and why)."""

    source: Literal["snapshot", "rebuilt"]
    reason: str | None  # why the snapshot was not used; None when it was
    replayed: int  # store records applied on top of the snapshot (or all of them, when rebuilt)


class EmbeddingIndex:
    """Durable embeddings + FAISS similarity search for one directory.

    Thread-safe: one lock serialises adds, searches and snapshots (FAISS forbids
    searching while adding). One open EmbeddingIndex per directory: a second one,
    in any process, is refused (``DIR/.lock``).
    """

    def __init__(
        self,
        directory: str | Path,
        dim: int,
        factory: str = "Flat",
        use_gpu: Literal["auto", "never", "always"] = "auto",
        snapshot_every_songs: int = 1000,
        snapshot_every_s: float = 60.0,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        train_size: int | None = None,
        expected_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if snapshot_every_songs < 1 or snapshot_every_s <= 0:
            raise ValueError("snapshot_every_songs must be >= 1 and snapshot_every_s > 0")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = FaissIndexConfig(
            dim=dim,
            factory=factory,
            use_gpu=use_gpu,
            nprobe=nprobe,
            ef_search=ef_search,
            train_size=train_size,
            expected_size=expected_size,
        )
        self.snapshot_every_songs = snapshot_every_songs
        self.snapshot_every_s = snapshot_every_s
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._since_snapshot = 0  # index changes not yet in a snapshot
        self._last_snapshot_at = clock()
        self._retry_snapshot_at = 0.0
        self._watermark = 0
        self._snapshot_watermark = 0  # the watermark of the snapshot on disk, as this process knows it
        self._lock_fd = _lock_directory(self.directory)
        try:
            snapshots.remove_stale_temp_files(self.directory)
            self.store = SqliteEmbeddingStore(self.directory / STORE_FILE)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._check_store_dims()
            placeholder = self.config.model_copy(update={"factory": "Flat"}) if self.config.factory == AUTO else None
            self._index = FaissVectorIndex(placeholder or self.config)  # replaced by _open
            self.open_report = self._open()
            self.maybe_snapshot()
        except BaseException:
            self.store.close()
            os.close(self._lock_fd)
            raise

    # -- paths ---------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_FILE

    @property
    def meta_path(self) -> Path:
        return self.directory / META_FILE

    def _temp_path(self, final: Path) -> Path:
        """Where a snapshot file is written before its rename (same directory: rename is atomic)."""
        return snapshots.temp_path(final)

    # -- open and reconcile --------------------------------------------------------------
    def _check_store_dims(self) -> None:
        dims = self.store.vector_dims()
        if dims - {self.config.dim}:
            raise ValueError(
                f"{self.store.path} holds vectors of dimension {sorted(dims)} (encoders "
                f"{sorted(self.store.encoder_ids())}) but the index is {self.config.dim}-d: "
                "use another index directory for another encoder"
            )

    def _open(self) -> OpenReport:
        loaded, reason = self._load_snapshot()
        if loaded is None:
            # A fresh directory (empty store) is routine; a rebuild of real data is worth a warning.
            level = logging.WARNING if self.store.max_seq() else logging.INFO
            log.log(level, "rebuilding the FAISS index in %s from the store: %s", self.directory, reason)
            return OpenReport("rebuilt", reason, self.rebuild())
        self._index, self._watermark = loaded
        self._snapshot_watermark = self._watermark
        replayed = self._catch_up()
        stored = self.store.count()
        if len(self._index) != stored:
            reason = f"after replay the index holds {len(self._index)} vectors but the store {stored}"
            log.warning("rebuilding the FAISS index in %s from the store: %s", self.directory, reason)
            return OpenReport("rebuilt", reason, self.rebuild())
        if replayed:
            log.info("FAISS index: loaded snapshot, replayed %d record(s) from the store", replayed)
        return OpenReport("snapshot", None, replayed)

    def _load_snapshot(self) -> tuple[tuple[FaissVectorIndex, int] | None, str]:
        """The snapshot and its watermark, or None and why it cannot be used."""
        loaded, reason = snapshots.load_snapshot(self.directory, self.store, self._snapshot_config)
        return ((loaded.index, loaded.watermark), "") if loaded is not None else (None, reason)

    def _snapshot_config(self, dim: int, factory: str) -> FaissIndexConfig | str:
        """This index's config for a snapshot of its dimension and factory; why another is refused.

        With ``auto`` any factory is taken: an existing index keeps the type it was created with.
        """
        if dim == self.config.dim and self.config.factory == AUTO:
            return self.config.model_copy(update={"factory": factory})
        if dim != self.config.dim or factory != self.config.factory:
            return (
                f"mismatched snapshot: dim {dim}, factory {factory!r}; "
                f"wanted dim {self.config.dim}, factory {self.config.factory!r}"
            )
        return self.config

    def _catch_up(self) -> int:
        """Apply every store change newer than the watermark: upserts (remove-then-add by key) and
        deletions (remove), in sequence order."""
        return snapshots.catch_up(self.store, self._watermark, self._apply, self._remove)

    def _remove(self, batch: Sequence[RemovedEmbedding]) -> int:
        keys = np.fromiter((r.key for r in batch), dtype=np.int64, count=len(batch))
        self._index.remove(keys)
        self._watermark = max(self._watermark, batch[-1].seq)
        self._since_snapshot += len(batch)
        return len(batch)

    def _apply(self, batch: Sequence[StoredEmbedding]) -> int:
        for stored in batch:
            if stored.record.vector.shape != (self.config.dim,):
                raise ValueError(
                    f"stored song {stored.record.song_id!r} has a {stored.record.vector.shape} vector, "
                    f"the index is {self.config.dim}-d"
                )
        keys = np.fromiter((s.key for s in batch), dtype=np.int64, count=len(batch))
        self._index.upsert(keys, np.stack([s.record.vector for s in batch]))
        self._watermark = max(self._watermark, batch[-1].seq)
        self._since_snapshot += len(batch)
        return len(batch)

    def rebuild(self) -> int:
        """Rebuild the FAISS index from the whole store; returns how many vectors it holds.

        Untrained factories (IVF…) train on the first ``train_size`` records, exactly
        as when streaming; with fewer records the vectors stay in the exact buffer. With
        ``auto`` the type is picked afresh, for the larger of ``expected_size`` and the store's size.
        """
        with self._lock:
            config = self.config
            if config.factory == AUTO:
                config = config.model_copy(update={"expected_size": max(config.expected_size or 0, self.store.count())})
            self._index = FaissVectorIndex(config)
            self._watermark = 0
            self._since_snapshot = 0
            pruned = self.store.deletions_pruned_through()
            applied = self._catch_up()
            self._watermark = max(self._watermark, pruned)  # built from every live record
            self._since_snapshot = max(self._since_snapshot, 1)  # the snapshot on disk is stale
            return applied

    # -- writes --------------------------------------------------------------------------
    def add(self, records: Sequence[EmbeddingRecord]) -> None:
        """Store records durably, index the new or changed ones, then maybe snapshot."""
        for rec in records:
            shape = np.shape(rec.vector)
            if shape != (self.config.dim,):
                raise ValueError(f"song {rec.song_id!r}: vector shape {shape}, the index is {self.config.dim}-d")
        with self._lock:
            self._check_open()
            changed = self.store.put_many_changed(records)
            if changed:
                seqs = sorted(changed.values())
                if seqs == list(range(self._watermark + 1, self._watermark + 1 + len(seqs))):
                    latest = {rec.song_id: rec for rec in records}  # last record per song, as stored
                    ids = sorted(changed, key=changed.__getitem__)
                    keys = np.fromiter((faiss_id(s) for s in ids), dtype=np.int64, count=len(ids))
                    vectors = np.stack([np.asarray(latest[s].vector, dtype=np.float32) for s in ids])
                    self._index.upsert(keys, vectors)
                    self._watermark = seqs[-1]
                    self._since_snapshot += len(ids)
                else:  # someone else wrote to the store: take everything since the watermark
                    self._catch_up()
        self.maybe_snapshot()

    def delete(self, song_ids: Sequence[str]) -> dict[str, int]:
        """Delete songs from the store durably, then drop their vectors (the store's deletion records
        carry them to every reader); ``{song_id: deletion seq}`` for those that were stored."""
        with self._lock:
            self._check_open()
            done = self.store.delete(song_ids)
            if done:
                self._catch_up()
        self.maybe_snapshot()
        return done

    def prune_deletions(self, deleted_before: float) -> int:
        """Forget the store's deletion records older than ``deleted_before`` (epoch s) that the snapshot
        on disk already applied (a reader loading it never needs them); how many."""
        with self._lock:
            self._check_open()
            return self.store.prune_deletions(deleted_before, self._snapshot_watermark)

    def maybe_snapshot(self) -> bool:
        """Snapshot if enough changes or ``snapshot_every_s`` seconds have piled up.

        Enough changes: ``snapshot_every_songs``, or a tenth of the index once that is more. A
        snapshot writes the whole index (O(size)), so a fixed count would make its cost per song
        grow with the index (0.42 ms per song at 100k 768-d vectors every 1,000 songs); growing
        the count keeps it flat, and the store replays whatever a snapshot lacks on start.

        A failed snapshot is logged, not raised: every record is already durable in
        the store, so a failure only lengthens the next start-up's replay. It is
        retried after ``min(snapshot_every_s, 30)`` seconds.
        """
        with self._lock:
            if self._closed or self._since_snapshot == 0:
                return False
            now = self._clock()
            if now < self._retry_snapshot_at:
                return False
            every = max(self.snapshot_every_songs, self._index.ntotal // 10)
            due = self._since_snapshot >= every or (now - self._last_snapshot_at >= self.snapshot_every_s)
            if not due:
                return False
            try:
                self.snapshot()
            except SnapshotError as exc:
                self._retry_snapshot_at = now + min(self.snapshot_every_s, 30.0)
                log.error("%s", exc)
                return False
            return True

    def snapshot(self) -> None:
        """Atomically replace the snapshot; raises :class:`SnapshotError` and keeps the old one on failure."""
        with self._lock:
            self._check_open()
            meta = snapshots.write_snapshot(
                self.directory, self._index, self._watermark, self.store.store_uid(), self._temp_path
            )
            self._since_snapshot = 0
            self._snapshot_watermark = int(meta["watermark"])
            self._last_snapshot_at = self._clock()
            self._retry_snapshot_at = 0.0
            log.info(
                "FAISS snapshot: %d vectors up to store seq %d (%d bytes)",
                meta["ntotal"],
                meta["watermark"],
                meta["bytes"],
            )

    # -- reads ---------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` most similar stored songs to ``vector``: (song_id, inner-product similarity)."""
        with self._lock:
            self._check_open()
            sims, keys = self._index.search(vector, k)
        return self._named(sims[0], keys[0], exclude=None, k=k)

    def search_by_song(self, song_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` songs most similar to a stored song, excluding the song itself; KeyError if unknown."""
        stored = self.store.get(song_id)
        if stored is None:
            raise KeyError(f"song {song_id!r} has no stored embedding")
        with self._lock:
            self._check_open()
            sims, keys = self._index.search(stored.record.vector, k + 1)
        return self._named(sims[0], keys[0], exclude=stored.key, k=k)

    def _named(self, sims: np.ndarray, keys: np.ndarray, exclude: int | None, k: int) -> list[tuple[str, float]]:
        hits = [(int(key), float(sim)) for key, sim in zip(keys, sims, strict=True) if key >= 0 and key != exclude]
        names = self.store.song_ids_for_keys(key for key, _ in hits)
        return [(names[key], sim) for key, sim in hits if key in names][:k]

    def contains(self, song_id: str) -> bool:
        return bool(self.store.contains([song_id]))

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def watermark(self) -> int:
        """The last store sequence number applied to the in-memory index."""
        return self._watermark

    @property
    def vector_index(self) -> FaissVectorIndex:
        """The FAISS index (replaced by :meth:`rebuild`: do not hold on to it)."""
        return self._index

    @property
    def index(self) -> FaissVectorIndex:
        """Alias of :attr:`vector_index`."""
        return self._index

    # -- lifecycle -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"embedding index {self.directory} is closed")

    def close(self) -> None:
        """Write a final snapshot if anything changed, then close the store (idempotent).

        A failed final snapshot still closes the store, then raises :class:`SnapshotError`.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._since_snapshot:
                    self.snapshot()
            finally:
                self._closed = True
                self.store.close()
                os.close(self._lock_fd)  # releases the directory lock

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_directory(directory: Path) -> int:
    """Hold an exclusive advisory lock on ``DIR/.lock`` while open; the OS drops it if we crash.

    Two processes feeding one directory would overwrite each other's snapshots
    (and delete each other's temp files), so the second one is refused.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # not POSIX: no advisory locks, trust the deployment
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"index directory {directory} is already open (locked by another EmbeddingIndex, in this "
            "process or another); each worker needs its own index directory"
        ) from None
    return fd
