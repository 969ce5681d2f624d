"""The durable embedding store: one SQLite file, the source of truth behind the FAISS index.

Why SQLite: the index must be rebuildable after a crash or a corrupt snapshot, so
every vector is first committed here (WAL + ``synchronous=FULL``: a returned
``put_many`` survives power loss). Each insert or change takes a new sequence
number from a persistent counter, so the index catches up with
``iter_since(watermark)`` and never has to diff the whole table. Re-putting an
identical record keeps its sequence number: replays of a Kafka topic cause no
index churn.

A deletion (a takedown) removes the row and records ``(seq, key, song_id)`` in the
``deletions`` table under a new sequence number from the same counter, so an index
catching up with ``iter_changes_since(watermark)`` sees upserts and deletions in the
order they happened and removes the vector; a rebuild from the store never sees the
song at all. Deletion rows are pruned once older than a horizon (:meth:`prune_deletions`,
retention): ``meta.deletions_pruned_through`` names the last pruned sequence number, and a
reader whose watermark is behind it reloads from the store whole (it may have missed a removal).

Retention selects songs by ``updated_at`` (when the record was last written: the song was
scored then), through an index on that column: the column sits after the layers blob (about
40 KB for MERT, in overflow pages), so a scan without the index would read every blob. The
clock that stamps ``updated_at`` and ``deleted_at`` is injectable (simulations).
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from indexes.base import EmbeddingRecord, EmbeddingStore, RemovedEmbedding, StoredEmbedding, faiss_id

log = logging.getLogger(__name__)

#: The store's file name in an index (shard) directory.
STORE_FILE = "embeddings.sqlite"

SCHEMA_VERSION = 1
# Stay well under SQLite's host-parameter limit (999 on old builds) in IN (...) queries.
_IN_CHUNK = 500
# The WAL file is cut back to this after a checkpoint (it otherwise keeps its largest size).
_WAL_LIMIT_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    song_id     TEXT PRIMARY KEY,
    key         INTEGER NOT NULL UNIQUE,
    seq         INTEGER NOT NULL UNIQUE,
    encoder_id  TEXT NOT NULL,
    layers      BLOB NOT NULL,
    n_layers    INTEGER NOT NULL,
    layer_dim   INTEGER NOT NULL,
    vector      BLOB NOT NULL,
    n_segments  INTEGER NOT NULL,
    n_frames    INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deletions (
    seq         INTEGER PRIMARY KEY,
    key         INTEGER NOT NULL,
    song_id     TEXT NOT NULL,
    deleted_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS embeddings_updated_at ON embeddings(updated_at);
"""

_COLUMNS = "song_id, key, seq, encoder_id, layers, n_layers, layer_dim, vector, n_segments, n_frames"


class KeyCollisionError(ValueError):
    """Two different song ids hash to the same int64 key (BLAKE2b, 63 bits: astronomically rare).

    Refused rather than silently overwriting the other song's vector in the index.
    """

    def __init__(self, song_id: str, other_song_id: str, key: int) -> None:
        super().__init__(
            f"song id {song_id!r} has the same index key {key} as the stored song {other_song_id!r}; "
            "refusing to store it (it would replace the other song's vector in the index)"
        )
        self.song_id = song_id
        self.other_song_id = other_song_id
        self.key = key


class SqliteEmbeddingStoreConfig(BaseModel):
    """Where the store lives and how long a writer waits for another process's lock."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    busy_timeout_s: float = Field(30.0, gt=0)


def _f32(name: str, song_id: str, array: np.ndarray, ndim: int) -> np.ndarray:
    """A record's array checked (shape, dtype, finite) as contiguous little-endian float32."""
    arr = np.asarray(array)
    if arr.ndim != ndim:
        raise ValueError(f"{song_id!r}: {name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype != np.float32:
        raise ValueError(f"{song_id!r}: {name} must be float32, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{song_id!r}: {name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{song_id!r}: {name} holds NaN or infinite values")
    return np.ascontiguousarray(arr, dtype="<f4")


class SqliteEmbeddingStore(EmbeddingStore):
    """:class:`EmbeddingStore` in one SQLite file.

    Thread safety: one connection per store object, serialised by a lock, so a
    store may be shared by threads (each call is atomic; a generator from
    :meth:`iter_since` takes the lock per batch). Several processes may open the
    same file (SQLite's own locking; writers wait up to ``busy_timeout_s``), but
    only one process should feed a FAISS index from it.
    """

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        #: Stamps ``updated_at`` and ``deleted_at`` (epoch s); a simulation sets its own.
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path),
            timeout=busy_timeout_s,
            isolation_level=None,  # explicit BEGIN/COMMIT below
            check_same_thread=False,  # guarded by self._lock
        )
        try:
            self._init_schema(self._conn)
        except BaseException:
            self.close()
            raise

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("SQLite refused WAL mode for %s (got %s); writes stay durable but slower", self.path, mode)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
        conn.executescript(_SCHEMA)
        with self._tx():
            row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(name, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                conn.execute("INSERT OR IGNORE INTO meta(name, value) VALUES ('last_seq', 0)")
                conn.execute(
                    "INSERT OR IGNORE INTO meta(name, value) VALUES ('store_uid', ?)",
                    (secrets.randbits(62) + 1,),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has embedding-store schema version {row[0]}, this code reads version {SCHEMA_VERSION}"
                )

    @classmethod
    def from_config(cls, config: SqliteEmbeddingStoreConfig) -> SqliteEmbeddingStore:
        return cls(config.path, busy_timeout_s=config.busy_timeout_s)

    # -- internals ---------------------------------------------------------------------
    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"embedding store {self.path} is closed")
        return self._conn

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    @staticmethod
    def _row(row: Sequence[Any]) -> StoredEmbedding:
        song_id, key, seq, encoder_id, layers, n_layers, layer_dim, vector, n_segments, n_frames = row
        record = EmbeddingRecord(
            song_id=song_id,
            encoder_id=encoder_id,
            # astype copies: callers get writable, native-order arrays, detached from SQLite's buffer.
            layers=np.frombuffer(layers, dtype="<f4").reshape(n_layers, layer_dim).astype(np.float32),
            vector=np.frombuffer(vector, dtype="<f4").astype(np.float32),
            n_segments=int(n_segments),
            n_frames=int(n_frames),
        )
        return StoredEmbedding(seq=int(seq), key=int(key), record=record)

    # -- writes ------------------------------------------------------------------------
    def put_many(self, records: Sequence[EmbeddingRecord]) -> None:
        """Insert or replace all records in one durable transaction (all or nothing).

        An identical record (same encoder, arrays and counts) is left untouched and
        keeps its sequence number. Raises ``ValueError`` for malformed arrays and
        :class:`KeyCollisionError` if a song id's key is taken by another song.
        """
        self.put_many_changed(records)

    def put_many_changed(self, records: Sequence[EmbeddingRecord]) -> dict[str, int]:
        """Like :meth:`put_many`; returns ``{song_id: new seq}`` for the records that changed.

        The index layer uses this to touch only what changed. Within one call a
        song id given twice takes its last record.
        """
        prepared: list[tuple[EmbeddingRecord, int, bytes, tuple[int, int], bytes]] = []
        for rec in records:
            layers = _f32("layers", rec.song_id, rec.layers, 2)
            vector = _f32("vector", rec.song_id, rec.vector, 1)
            if rec.n_segments < 0 or rec.n_frames < 0:
                raise ValueError(f"{rec.song_id!r}: n_segments and n_frames must be >= 0")
            shape = (int(layers.shape[0]), int(layers.shape[1]))
            prepared.append((rec, faiss_id(rec.song_id), layers.tobytes(), shape, vector.tobytes()))
        if not prepared:
            return {}
        changed: dict[str, int] = {}
        now = self.clock()
        with self._tx() as db:
            last_seq = int(db.execute("SELECT value FROM meta WHERE name='last_seq'").fetchone()[0])
            for rec, key, layers_b, shape, vector_b in prepared:
                owner = db.execute("SELECT song_id FROM embeddings WHERE key=?", (key,)).fetchone()
                if owner is not None and owner[0] != rec.song_id:
                    raise KeyCollisionError(rec.song_id, owner[0], key)
                old = db.execute(
                    "SELECT encoder_id, layers, n_layers, layer_dim, vector, n_segments, n_frames "
                    "FROM embeddings WHERE song_id=?",
                    (rec.song_id,),
                ).fetchone()
                new = (rec.encoder_id, layers_b, shape[0], shape[1], vector_b, rec.n_segments, rec.n_frames)
                if old is not None and tuple(old) == new:
                    continue
                last_seq += 1
                db.execute(
                    "INSERT INTO embeddings(song_id, key, seq, encoder_id, layers, n_layers, layer_dim, "
                    "vector, n_segments, n_frames, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(song_id) DO UPDATE SET seq=excluded.seq, encoder_id=excluded.encoder_id, "
                    "layers=excluded.layers, n_layers=excluded.n_layers, layer_dim=excluded.layer_dim, "
                    "vector=excluded.vector, n_segments=excluded.n_segments, n_frames=excluded.n_frames, "
                    "updated_at=excluded.updated_at",
                    (rec.song_id, key, last_seq, *new, now),
                )
                changed[rec.song_id] = last_seq
            if changed:
                db.execute("UPDATE meta SET value=? WHERE name='last_seq'", (last_seq,))
        return changed

    def delete(self, song_ids: Sequence[str]) -> dict[str, int]:
        """Remove these songs' records in one durable transaction; ``{song_id: deletion seq}`` for
        those that were stored (a song not stored here takes no sequence number)."""
        ids = list(dict.fromkeys(song_ids))
        done: dict[str, int] = {}
        if not ids:
            return done
        now = self.clock()
        with self._tx() as db:
            last_seq = int(db.execute("SELECT value FROM meta WHERE name='last_seq'").fetchone()[0])
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT song_id, key FROM embeddings WHERE song_id IN ({marks})", chunk)
                for song_id, key in sorted(rows.fetchall()):
                    last_seq += 1
                    db.execute(
                        "INSERT INTO deletions(seq, key, song_id, deleted_at) VALUES (?,?,?,?)",
                        (last_seq, key, song_id, now),
                    )
                    done[song_id] = last_seq
                db.execute(f"DELETE FROM embeddings WHERE song_id IN ({marks})", chunk)
            if done:
                db.execute("UPDATE meta SET value=? WHERE name='last_seq'", (last_seq,))
        return done

    def prune_deletions(self, deleted_before: float, through_seq: int) -> int:
        """Drop deletion records older than ``deleted_before`` (epoch s) with seq <= ``through_seq``
        (what the caller's own index has applied); how many. Readers behind the pruned sequence
        number reload whole (:meth:`deletions_pruned_through`)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT MAX(seq), COUNT(*) FROM deletions WHERE deleted_at < ? AND seq <= ?",
                (deleted_before, through_seq),
            ).fetchone()
            last, n = row[0], int(row[1])
            if not n:
                return 0
            db.execute("DELETE FROM deletions WHERE seq <= ?", (int(last),))
            db.execute(
                "INSERT INTO meta(name, value) VALUES ('deletions_pruned_through', ?) "
                "ON CONFLICT(name) DO UPDATE SET value=MAX(value, excluded.value)",
                (int(last),),
            )
        return n

    def deletions_pruned_through(self) -> int:
        """The last pruned deletion's seq (0: none): an index whose watermark is below it may hold a
        vector whose removal it can no longer read, and must rebuild from the store."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name='deletions_pruned_through'").fetchone()
        return 0 if row is None else int(row[0])

    def older_than(self, before: float, limit: int) -> list[tuple[StoredEmbedding, float]]:
        """Up to ``limit`` records last written before ``before`` (epoch s), oldest first, with their
        ``updated_at``: what retention archives, then deletes."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS}, updated_at FROM embeddings WHERE updated_at < ? ORDER BY updated_at LIMIT ?",
                (before, int(limit)),
            ).fetchall()
        return [(self._row(row[:-1]), float(row[-1])) for row in rows]

    def file_stats(self) -> dict[str, int]:
        """What the store takes on disk: file and WAL bytes, pages in use (page_count - freelist_count), page size."""
        with self._lock:
            pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
            free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
            page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        wal = self.path.with_name(self.path.name + "-wal")
        return {
            "file_bytes": self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "live_pages": pages - free,
            "page_size": page_size,
        }

    # -- reads -------------------------------------------------------------------------
    def get(self, song_id: str) -> StoredEmbedding | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM embeddings WHERE song_id=?", (song_id,)).fetchone()
        return None if row is None else self._row(row)

    def get_many(self, song_ids: Sequence[str]) -> dict[str, StoredEmbedding]:
        """The stored records among ``song_ids`` (missing ids are absent from the result)."""
        out: dict[str, StoredEmbedding] = {}
        for chunk in _chunks(list(dict.fromkeys(song_ids))):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM embeddings WHERE song_id IN ({marks})", chunk
                ).fetchall()
            for row in rows:
                stored = self._row(row)
                out[stored.record.song_id] = stored
        return out

    def contains(self, song_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(song_ids))):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(f"SELECT song_id FROM embeddings WHERE song_id IN ({marks})", chunk)
                found.update(r[0] for r in rows)
        return found

    def song_ids_for_keys(self, keys: Iterable[int]) -> dict[int, str]:
        """Map index keys back to song ids (search results carry keys only)."""
        out: dict[int, str] = {}
        for chunk in _chunks(list(dict.fromkeys(int(k) for k in keys))):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(f"SELECT key, song_id FROM embeddings WHERE key IN ({marks})", chunk)
                out.update((int(k), s) for k, s in rows)
        return out

    def iter_since(self, seq: int, batch_size: int = 4096) -> Iterator[StoredEmbedding]:
        """Records with sequence number > ``seq``, in order, fetched ``batch_size`` rows at a time.

        Keyset pagination: each batch is its own short query, so no read
        transaction stays open while the caller works. A record replaced during
        the iteration shows up again later under its new sequence number.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        last = int(seq)
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM embeddings WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, batch_size),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._row(row)
            last = int(rows[-1][2])
            if len(rows) < batch_size:
                return

    def iter_changes_since(self, seq: int, batch_size: int = 4096) -> Iterator[StoredEmbedding | RemovedEmbedding]:
        """Upserts (:class:`StoredEmbedding`) and deletions (:class:`RemovedEmbedding`) with sequence
        number > ``seq``, merged in sequence order, ``batch_size`` of each read at a time.

        A deletion comes after the upsert it removes; a song stored again after its deletion
        comes back under a later number. Callers apply them in order: upsert, or remove the key.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        upserts = self.iter_since(seq, batch_size)
        deletions = self._iter_deletions(seq, batch_size)
        up, gone = next(upserts, None), next(deletions, None)
        while up is not None or gone is not None:
            if gone is None or (up is not None and up.seq < gone.seq):
                assert up is not None
                yield up
                up = next(upserts, None)
            else:
                yield gone
                gone = next(deletions, None)

    def _iter_deletions(self, seq: int, batch_size: int) -> Iterator[RemovedEmbedding]:
        last = int(seq)
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, key, song_id FROM deletions WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch_size)
                ).fetchall()
            for row in rows:
                yield RemovedEmbedding(int(row[0]), int(row[1]), str(row[2]))
            if len(rows) < batch_size:
                return
            last = int(rows[-1][0])

    def max_seq(self) -> int:
        """The last sequence number handed out, to an upsert or a deletion (0 for an empty store)."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE name='last_seq'").fetchone()[0])

    def store_uid(self) -> int:
        """Random id fixed when the file was created: tells a replaced or restored store from this one."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE name='store_uid'").fetchone()[0])

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def encoder_ids(self) -> set[str]:
        """Encoders whose embeddings are stored (more than one means a mixed, re-encodable store)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT encoder_id FROM embeddings")}

    def vector_dims(self) -> set[int]:
        """Distinct index-vector dimensions stored (float32 blobs are 4 bytes an element)."""
        with self._lock:
            return {int(r[0]) // 4 for r in self._db.execute("SELECT DISTINCT length(vector) FROM embeddings")}

    def close(self) -> None:
        """Close the connection (idempotent); committed writes are already durable."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteEmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` under the store lock; rolls back on any exception."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (disk full, I/O error) may leave the transaction open.
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            elif self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            self._lock.release()


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]
