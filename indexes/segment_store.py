"""The offline segment store: per-song segment features and embedding failures, in one SQLite file.

``apexrank embed`` (:func:`ranker.embed.embed_catalog`) writes it beside the
embedding store of a features directory (``segments.sqlite``); the ablation's
"segment" input mode trains on it. One row per song, so that loading 100k songs is
100k rows, not millions::

    segments(song_id TEXT PRIMARY KEY, encoder_id TEXT, n_segments INT, n_layers INT,
             dim INT, frames BLOB  -- little-endian int64, (n_segments,)
             features BLOB)        -- little-endian float32, (n_segments, n_layers, dim), C order
    failures(song_id TEXT PRIMARY KEY, code TEXT, message TEXT, failed_at REAL)
    meta(name TEXT PRIMARY KEY, value TEXT)   -- schema_version

WAL with ``synchronous=FULL``. A file of another schema version is a :class:`SegmentStoreError`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SEGMENTS_SCHEMA_VERSION = 1
_IN_CHUNK = 500

_SEGMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    song_id     TEXT PRIMARY KEY,
    encoder_id  TEXT NOT NULL,
    n_segments  INTEGER NOT NULL,
    n_layers    INTEGER NOT NULL,
    dim         INTEGER NOT NULL,
    frames      BLOB NOT NULL,
    features    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    song_id    TEXT PRIMARY KEY,
    code       TEXT NOT NULL,
    message    TEXT NOT NULL,
    failed_at  REAL NOT NULL
);
"""


class SegmentStoreError(Exception):
    """A segment store this code cannot read (another schema version)."""


class SegmentFailure(Protocol):
    """A song that could not be embedded, as the store records it."""

    @property
    def song_id(self) -> str: ...

    @property
    def code(self) -> str: ...

    @property
    def message(self) -> str: ...


class SegmentStore:
    """Per-song segment features and embedding failures in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SEGMENTS_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)",
                    (str(SEGMENTS_SCHEMA_VERSION),),
                )
            elif int(row[0]) != SEGMENTS_SCHEMA_VERSION:
                raise SegmentStoreError(
                    f"{self.path} has segment-store schema {row[0]}, this code reads {SEGMENTS_SCHEMA_VERSION}"
                )
        except BaseException:
            self.close()
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"segment store {self.path} is closed")
        return self._conn

    def put(
        self,
        encoder_id: str,
        songs: Sequence[tuple[str, np.ndarray, np.ndarray]],
        failures: Sequence[SegmentFailure] = (),
    ) -> None:
        """Store ``(song_id, features (S, L, D), frames (S,))`` per song and the failures, atomically.

        A stored song's old failure is cleared; a failed song's old segments are kept (they
        still describe the audio as it was when it last decoded).
        """
        rows = []
        for song_id, feats, frames in songs:
            f = np.ascontiguousarray(feats, dtype="<f4")
            fr = np.ascontiguousarray(frames, dtype="<i8")
            if f.ndim != 3 or fr.shape != (f.shape[0],):
                raise ValueError(f"{song_id!r}: segment features {f.shape} and frames {fr.shape} disagree")
            rows.append((song_id, encoder_id, f.shape[0], f.shape[1], f.shape[2], fr.tobytes(), f.tobytes()))
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO segments(song_id, encoder_id, n_segments, n_layers, dim, "
                    "frames, features) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                db.executemany("DELETE FROM failures WHERE song_id=?", [(r[0],) for r in rows])
                db.executemany(
                    "INSERT OR REPLACE INTO failures(song_id, code, message, failed_at) VALUES (?,?,?,?)",
                    [(f.song_id, f.code, f.message, now) for f in failures],
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def get_many(self, song_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{song_id: (features (S, L, D) float32, frames (S,) int64)}`` for the stored ones."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for chunk in _chunks(list(dict.fromkeys(song_ids))):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    "SELECT song_id, n_segments, n_layers, dim, frames, features FROM segments "
                    f"WHERE song_id IN ({marks})",
                    chunk,
                ).fetchall()
            for song_id, s, n_layers, dim, frames, feats in rows:
                out[song_id] = (
                    np.frombuffer(feats, dtype="<f4").reshape(s, n_layers, dim).astype(np.float32),
                    np.frombuffer(frames, dtype="<i8").astype(np.int64),
                )
        return out

    def failures(self) -> dict[str, tuple[str, str]]:
        """``{song_id: (error code, message)}`` of songs whose last attempt failed."""
        with self._lock:
            rows = self._db.execute("SELECT song_id, code, message FROM failures").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SegmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]
