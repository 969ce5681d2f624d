"""A read-only view of the worker's embedding index, for the API process.

The worker owns its index directory (``EmbeddingIndex`` locks it). The API opens
the same directory without the lock and never writes to it: it loads the FAISS
snapshot, on the checks the worker applies (:func:`indexes.snapshots.load_snapshot`:
format, store uid, watermark, size, sha256, vector count; the dimension and factory
are the snapshot's own), and then applies every embedding-store record newer than
the snapshot's watermark (:func:`indexes.snapshots.catch_up`). A snapshot that fails
a check is not used: the index is built from the whole store instead.
:meth:`IndexReader.refresh` repeats that catch-up (the API calls it every
``api.index_refresh_s`` seconds and on ``POST /v1/index/reload``), and reloads
from scratch when the worker has written a snapshot of a different store (the
store was replaced or restored) or when its watermark fell behind the deletions the
store has pruned (retention: removals it would need are no longer recorded). Deletions
in the store (takedown, retention) remove the vectors as the reader catches up. A store that is
gone (its shard directory deleted) is dropped at the next refresh: its songs leave search and its
files are closed. SQLite's WAL mode lets this reader run beside the worker's writes. The fan-out over
several shards is :mod:`indexes.sharded_reader`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from indexes import snapshots
from indexes.base import RemovedEmbedding, StoredEmbedding, faiss_id
from indexes.faiss_config import AUTO, FaissIndexConfig
from indexes.faiss_index import FaissVectorIndex
from indexes.reader_status import NotLoaded, frozen
from indexes.reader_status import ReaderStatus as ReaderStatus  # re-exported: what both readers report
from indexes.reader_threads import ReadWriteLock, every
from indexes.sharded_reader import ShardedIndexReader as ShardedIndexReader  # re-exported: it builds on this one
from indexes.snapshots import STORE_FILE
from indexes.sqlite_embeddings import SqliteEmbeddingStore
from indexes.vector_mean import mean_direction, vector_sum

log = logging.getLogger(__name__)


class IndexReader:
    """Snapshot + store catch-up, searchable; thread-safe (searches share, updates exclude)."""

    def __init__(
        self,
        directory: str | Path,
        factory: str = "Flat",
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        expected_size: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.factory = factory
        self.expected_size = expected_size
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._lock = ReadWriteLock()
        #: One load or refresh at a time (the refresh thread and POST /v1/index/reload): a second
        #: load closed the store the first one's catch-up was still reading.
        self._loading = threading.RLock()
        self._store: SqliteEmbeddingStore | None = None
        self._index: FaissVectorIndex | None = None
        self._watermark = 0
        self._store_uid = 0
        self._source = "none"
        self._reason: str | None = "not loaded yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The sum of the indexed vectors (float64), kept as vectors come and go: the catalog's mean direction.
        self._sum: np.ndarray | None = None
        #: Bumped whenever ``_sum`` changes; :meth:`mean_direction` recomputes only then (every personal
        #: page asks for it; the sum moves only with a catch-up).
        self.sum_generation = 0
        self._direction: tuple[int, np.ndarray | None] = (-1, None)

    # -- loading -----------------------------------------------------------------------------
    def load(self) -> ReaderStatus:
        """(Re)load from the snapshot, or from the whole store when the snapshot is unusable."""
        with self._loading:
            return self._load()

    def _load(self) -> ReaderStatus:
        store_path = self.directory / STORE_FILE
        if not store_path.exists():
            self._drop(f"no embedding store at {store_path}")
            return self.status()
        store = SqliteEmbeddingStore(store_path)
        try:
            index, watermark, source, reason = self._open(store)
        except BaseException:
            store.close()
            raise
        pruned = store.deletions_pruned_through()
        total = vector_sum(index)
        with self._lock:
            old = self._store
            self._store, self._index, self._watermark = store, index, watermark
            self._sum = total
            self.sum_generation += 1
            self._store_uid = store.store_uid()
            self._source, self._reason = source, reason
        self._catch_up()
        if source == "store":  # built from every live record: no pruned removal concerns it
            with self._lock:
                if self._store is store:
                    self._watermark = max(self._watermark, pruned)
        if old is not None:
            old.close()
        status = self.status()
        log.info("index reader: %d vectors (%s) from %s", status.vectors, status.source, self.directory)
        return status

    def _drop(self, reason: str) -> None:
        """Hold nothing: a deleted store's songs leave search, and its files (deleted) are no longer held
        open. Swapped out under the write lock, so no search still reads the store closed after it."""
        with self._lock:
            old, n = self._store, self._index.ntotal if self._index is not None else 0
            if old is not None:
                self._store, self._index, self._sum = None, None, None
                self._watermark, self._store_uid, self._source = 0, 0, "none"
                self.sum_generation += 1
            self._reason = reason
        if old is not None:
            old.close()
            log.warning("index reader: %s; its %d vectors left search", reason, n)

    def _open(self, store: SqliteEmbeddingStore) -> tuple[FaissVectorIndex | None, int, str, str | None]:
        loaded, why = snapshots.load_snapshot(self.directory, store, self._config)
        if loaded is not None:
            return loaded.index, loaded.watermark, "snapshot", None
        dims = store.vector_dims()
        if not dims:
            return None, 0, "store", f"{why}; the store is empty"
        if len(dims) > 1:
            raise ValueError(f"{store.path} holds vectors of several dimensions {sorted(dims)}")
        return self._fresh(dims.pop(), store), 0, "store", why

    def _config(self, dim: int, factory: str) -> FaissIndexConfig:
        return FaissIndexConfig(dim=dim, factory=factory, use_gpu="never", nprobe=self.nprobe, ef_search=self.ef_search)

    def _fresh(self, dim: int, store: SqliteEmbeddingStore) -> FaissVectorIndex:
        """An empty index to fill from the store; ``auto`` picks for the larger of the expected and stored sizes."""
        size = self.expected_size
        if self.factory == AUTO:
            size = max(size or 0, store.count())
        return FaissVectorIndex(self._config(dim, self.factory).model_copy(update={"expected_size": size}))

    def _catch_up(self) -> int:
        """Apply store records newer than the watermark.

        The store is read without the lock and each batch applied under it: a page's vector
        reads (on the API's event loop) wait for one batch's upsert at most, not for a whole
        catch-up (a reload's can be hundreds of thousands of records).
        """
        store = self._store
        if store is None:
            return 0
        return snapshots.catch_up(
            store,
            self._watermark,
            lambda batch: self._apply(store, batch),
            lambda batch: self._remove(store, batch),
        )

    def _apply(self, store: SqliteEmbeddingStore, batch: list[StoredEmbedding]) -> int:
        keys = np.fromiter((s.key for s in batch), dtype=np.int64, count=len(batch))
        vectors = np.stack([s.record.vector for s in batch]).astype(np.float32)
        with self._lock:
            if self._store is not store:  # a reload swapped the store meanwhile: its own catch-up applies
                return 0
            if self._index is None:
                self._index = self._fresh(batch[0].record.vector.shape[0], store)
            replaced = self._index.reconstruct_many(keys)  # an upsert of a song already indexed replaces its vector
            self._shift(vectors.sum(axis=0, dtype=np.float64), replaced)
            self._index.upsert(keys, vectors)
            self._watermark = max(self._watermark, batch[-1].seq)
        return len(batch)

    def _remove(self, store: SqliteEmbeddingStore, batch: list[RemovedEmbedding]) -> int:
        keys = np.fromiter((r.key for r in batch), dtype=np.int64, count=len(batch))
        with self._lock:
            if self._store is not store:
                return 0
            if self._index is not None:
                self._shift(None, self._index.reconstruct_many(keys))
                self._index.remove(keys)
            self._watermark = max(self._watermark, batch[-1].seq)
        return len(batch)

    def refresh(self) -> int:
        """Apply new store records; reload when there is no store yet or it was replaced, drop all when it is gone."""
        with self._loading:
            return self._refresh()

    def _refresh(self) -> int:
        store = self._store
        if store is None or not (self.directory / STORE_FILE).exists():
            self.load()
            return self.status().vectors
        try:
            replaced = store.store_uid() != self._store_uid or self._watermark < store.deletions_pruned_through()
        except Exception:  # the file was swapped under us: start over (or its pruned removals concern us)
            replaced = True
        if replaced:
            self.load()
            return self.status().vectors
        return self._catch_up()

    def start(self, every_s: float) -> None:
        """Refresh in a daemon thread every ``every_s`` seconds (errors are logged, not raised)."""
        if self._thread is not None:
            return

        self._thread = every(every_s, self._stop, self.refresh, "index-refresh")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store, self._index = None, None

    def _shift(self, added: np.ndarray | None, gone: dict[int, np.ndarray]) -> None:
        """Keep the vector sum (under the lock): ``added`` (a sum of vectors) in, the ``gone`` vectors out."""
        delta = added
        if gone:
            out = np.sum(np.stack(list(gone.values())).astype(np.float64), axis=0)
            delta = -out if delta is None else delta - out
        if delta is None:
            return
        self._sum = delta if self._sum is None or len(self._sum) != len(delta) else self._sum + delta
        self.sum_generation += 1

    # -- reads -------------------------------------------------------------------------------
    def vector_sum(self) -> tuple[np.ndarray | None, int]:
        """The sum of the indexed vectors and how many there are (None, 0 before any)."""
        self._lock.acquire_read()
        try:
            n = self._index.ntotal if self._index is not None else 0
            return (None if self._sum is None else self._sum.copy()), n
        finally:
            self._lock.release_read()

    def mean_direction(self) -> np.ndarray | None:
        """The catalog's mean vector, unit length: the direction every song shares (:func:`mean_direction`).
        Computed once per change of the vector sum; read-only."""
        generation = self.sum_generation  # read first: a change after it only makes the next call recompute
        cached, direction = self._direction
        if cached != generation:
            direction = frozen(mean_direction([self.vector_sum()]))
            self._direction = (generation, direction)
        return direction

    def status(self) -> ReaderStatus:
        self._lock.acquire_read()
        try:
            n = self._index.ntotal if self._index is not None else 0
            ready = self._store is not None
            return ReaderStatus(ready, n, self._watermark, self._source, self._reason)
        finally:
            self._lock.release_read()

    @property
    def ready(self) -> bool:
        return self.status().ready

    @property
    def index_factory(self) -> str | None:
        """The concrete factory of the loaded index (the snapshot's, or ``auto``'s pick); None before a load."""
        index = self._index
        return index.config.factory if index is not None else None

    def vectors(self, song_ids: Sequence[str], keys: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The indexed vectors of these songs (those not indexed are absent), in their order.

        ``keys``: the songs' :func:`faiss_id`, when the caller has them (the API's song table
        keeps them), to spare the hashing.
        """
        if keys is None:
            keys = [faiss_id(song_id) for song_id in song_ids]
        self._lock.acquire_read()
        try:
            if self._index is None:
                return {}
            found = self._index.reconstruct_many(np.asarray(keys, dtype=np.int64))
        finally:
            self._lock.release_read()
        return {s: found[k] for s, k in zip(song_ids, keys, strict=True) if k in found}

    def vector_matrix(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of these faiss ids as one float32 matrix, row ``i`` for ``keys[i]``, and which rows
        were found (absent ones are zero rows); no per-song dict, so a page's block of some hundred
        vectors is read and dotted as one array. ``(0, 0)`` columns when nothing is found."""
        asked = np.asarray(keys, dtype=np.int64)
        self._lock.acquire_read()
        try:
            if self._index is not None:
                return self._index.reconstruct_matrix(asked)
        finally:
            self._lock.release_read()
        return np.zeros(len(asked), np.bool_), np.zeros((len(asked), 0), np.float32)

    def similar(self, song_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest songs (cosine), excluding the song; KeyError if it is not indexed."""
        vector = self.vector_of(song_id)
        if vector is None:
            raise KeyError(song_id)
        return [(s, sim) for s, sim in self.search(vector, k + 1) if s != song_id][:k]

    def vector_of(self, song_id: str) -> np.ndarray | None:
        """The song's stored vector, or None when this index does not hold it. The store is read under the
        read lock (as in :meth:`search`): a reload swaps it under the write lock, then closes the old one."""
        self._lock.acquire_read()
        try:
            store = self._store
            if store is None or self._index is None:
                raise NotLoaded("the index is not loaded")
            stored = store.get(song_id)
        finally:
            self._lock.release_read()
        return None if stored is None else stored.record.vector.astype(np.float32)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest songs to ``vector``: (song_id, similarity), best first."""
        self._lock.acquire_read()
        try:
            store, index = self._store, self._index
            if store is None or index is None:
                raise NotLoaded("the index is not loaded")
            sims, keys = index.search(vector, k)
            hits = [(int(key), float(sim)) for key, sim in zip(keys[0], sims[0], strict=True) if key >= 0]
            names = store.song_ids_for_keys(key for key, _ in hits)
        finally:
            self._lock.release_read()
        return [(names[key], sim) for key, sim in hits if key in names]


def open_index_reader(
    directories: Sequence[Path],
    factory: str,
    *,
    expected_size: int | None = None,
    nprobe: int | None = None,
    discover: Callable[[], Sequence[Path]] | None = None,
) -> IndexReader | ShardedIndexReader:
    """One reader for one fixed directory, a fan-out reader for several or for a glob (``index.shards``:
    ``discover`` finds its directories again at every refresh)."""
    if len(directories) == 1 and discover is None:
        return IndexReader(directories[0], factory, expected_size=expected_size, nprobe=nprobe)
    readers = [IndexReader(d, factory, expected_size=expected_size, nprobe=nprobe) for d in directories]
    return ShardedIndexReader(readers, discover=discover)
