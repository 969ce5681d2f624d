"""The archive of expired embeddings: Parquet files outside the hot store, for retraining and audits.

Retention moves a song's embedding here before it deletes it from the shard's SQLite store
(and so from the FAISS index). Kept whole: the vector and the pooled layers. The layers are
what a head is (re)trained on, and an expired song is the best training example there is: its
engagement has matured. With them go the song's generator, creation time and model, read from
the score store at the sweep: with the engagement log, all that retraining needs once the song's
hash has left Redis. A vector search over expired songs is not offered (no archive index);
a caller who needs one builds it from these files.

Layout: ``<archive>/day=YYYY-MM-DD/expired-<store>-<first seq>-<last seq>-<n>.parquet``, the day
being the sweep's and ``<store>`` the embedding store's uid in hex (shards sharing one archive
directory never collide). A file is written under a temporary name, fsynced, then renamed: a crash
leaves no half file under a final name, and the store's next write removes such a temporary once it
is an hour old. The name comes from the records' store sequence numbers, so a sweep that crashed
after the archive write and before the store deletion writes the same file again (replaced,
never doubled) when it runs again; across a day boundary the song may be in two files, and
:meth:`EmbeddingArchive.get_many` keeps the newest.

The arrays are stored as raw little-endian float32 bytes with their shape (no list encoding,
no compression: embeddings do not compress); the other columns are zstd-compressed.

Lookups by song (:meth:`EmbeddingArchive.get_many`, ``vectors``, ``metadata``) sit on the feedback
consumer's per-batch path (a like of an expired or unknown song), and the archive only grows, so
they must not read every file. Each :class:`EmbeddingArchive` object keeps an index of which file
holds which song: per file (known by inode, mtime and size, so a replaced file is read again), the
sorted 64-bit BLAKE2b hashes of its song ids, read from the ``song_id`` column once. A lookup reads
rows only from the files whose hashes match, and only the columns it returns. Memory: 8 bytes per
archived song; a file that is gone (pruned) drops out at the next lookup.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexes.base import EmbeddingRecord, StoredEmbedding
from indexes.durable import fsync_dir, stale

SCHEMA = pa.schema(
    [
        ("song_id", pa.string()),
        ("key", pa.int64()),
        ("seq", pa.int64()),
        ("encoder_id", pa.string()),
        ("n_layers", pa.int32()),
        ("layer_dim", pa.int32()),
        ("layers", pa.binary()),
        ("vector", pa.binary()),
        ("n_segments", pa.int32()),
        ("n_frames", pa.int32()),
        ("updated_at", pa.float64()),  # when the store last wrote it (epoch s)
        ("expired_at", pa.float64()),  # when the sweep archived it
        # From the score store at the sweep (None where it had no record): what retraining reads
        # besides the layers and the engagement log, once the song's hash is gone.
        ("generator", pa.string()),
        ("created_at", pa.string()),
        ("model_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class SongMeta:
    """What the archive keeps of a song's score-store record."""

    generator: str | None = None
    created_at: str | None = None  # RFC 3339
    model_version: str | None = None


_COMPRESSION = {name: "zstd" for name in SCHEMA.names} | {"layers": "none", "vector": "none"}


class EmbeddingArchive:
    """Expired embeddings under one directory (see the module docstring)."""

    def __init__(self, directory: str | Path, store_uid: int = 0) -> None:
        self.dir = Path(directory)
        self.store_uid = store_uid
        #: Per file: (inode, mtime ns, size) when its ids were read, and their sorted hashes.
        self._ids: dict[Path, tuple[tuple[int, int, int], np.ndarray]] = {}

    def write(
        self,
        rows: Sequence[tuple[StoredEmbedding, float]],
        expired_at: float,
        meta: Mapping[str, SongMeta] | None = None,
    ) -> Path | None:
        """Archive ``(record, updated_at)`` rows durably in one file, with each song's ``meta`` where
        given; its path (None for no rows)."""
        if not rows:
            return None
        self._sweep_leftovers()
        metas = [(meta or {}).get(s.record.song_id, SongMeta()) for s, _ in rows]
        layers = [np.ascontiguousarray(s.record.layers, dtype="<f4") for s, _ in rows]
        table = pa.table(
            {
                "song_id": [s.record.song_id for s, _ in rows],
                "key": [s.key for s, _ in rows],
                "seq": [s.seq for s, _ in rows],
                "encoder_id": [s.record.encoder_id for s, _ in rows],
                "n_layers": [a.shape[0] for a in layers],
                "layer_dim": [a.shape[1] for a in layers],
                "layers": [a.tobytes() for a in layers],
                "vector": [np.ascontiguousarray(s.record.vector, dtype="<f4").tobytes() for s, _ in rows],
                "n_segments": [s.record.n_segments for s, _ in rows],
                "n_frames": [s.record.n_frames for s, _ in rows],
                "updated_at": [float(u) for _, u in rows],
                "expired_at": [float(expired_at)] * len(rows),
                "generator": [m.generator for m in metas],
                "created_at": [m.created_at for m in metas],
                "model_version": [m.model_version for m in metas],
            },
            schema=SCHEMA,
        )
        seqs = [s.seq for s, _ in rows]
        day = datetime.fromtimestamp(expired_at, UTC).date().isoformat()
        folder = self.dir / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"expired-{self.store_uid:x}-{min(seqs)}-{max(seqs)}-{len(rows)}.parquet"
        tmp = folder / f".{final.name}.tmp"
        pq.write_table(table, tmp, compression=_COMPRESSION)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)  # the expired rows leave the store only once their file is durable
        return final

    #: A temporary file older than this is what a write cut short left (a write takes seconds).
    LEFTOVER_AFTER_S = 3600.0

    def _sweep_leftovers(self) -> None:
        """Delete this store's temporary files that a crash mid-write left behind: the next sweep
        writes other rows, under another name, so nothing else would ever remove them."""
        for left in stale(self.dir.glob(f"day=*/.expired-{self.store_uid:x}-*.parquet.tmp"), self.LEFTOVER_AFTER_S):
            left.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("day=*/expired-*.parquet"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def song_ids(self) -> set[str]:
        out: set[str] = set()
        for path in self.files():
            out.update(pq.read_table(path, columns=["song_id"]).column("song_id").to_pylist())
        return out

    def metadata(self, song_ids: Iterable[str]) -> dict[str, SongMeta]:
        """The archived score-store fields of these songs (where archived; the latest archived)."""
        rows = self._rows(song_ids, ["generator", "created_at", "model_version"])
        return {s: SongMeta(r["generator"], r["created_at"], r["model_version"]) for s, r in rows.items()}

    def get_many(self, song_ids: Iterable[str]) -> dict[str, StoredEmbedding]:
        """The archived records of these songs (the latest archived, where one was archived twice)."""
        return {s: _stored(r) for s, r in self._rows(song_ids, SCHEMA.names).items()}

    def vectors(self, song_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The archived records' ``vector`` of these songs, as :meth:`get_many` would give them, without
        reading the layers (most of a row's bytes)."""
        return {s: _vector(r) for s, r in self._rows(song_ids, ["vector"]).items()}

    def _rows(self, song_ids: Iterable[str], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each song's latest archived row (by ``expired_at``; the later file on a tie) with ``columns``,
        read only from the files the index says may hold one of them."""
        ids = list(dict.fromkeys(song_ids))
        if not ids:
            return {}
        wanted, value_set = _hashes(ids), pa.array(ids, type=pa.string())
        needed = list(dict.fromkeys(["song_id", "expired_at", *columns]))
        out: dict[str, dict[str, Any]] = {}
        for path, hashes in self._indexed().items():
            if not _holds_any(hashes, wanted):
                continue
            try:
                table = self._read(path, needed)
            except FileNotFoundError:  # pruned since the index saw it
                continue
            for row in table.filter(pc.is_in(table.column("song_id"), value_set=value_set)).to_pylist():
                seen = out.get(row["song_id"])
                if seen is None or seen["expired_at"] <= row["expired_at"]:
                    out[row["song_id"]] = row
        return out

    def _indexed(self) -> dict[Path, np.ndarray]:
        """Each archive file's sorted song-id hashes, reading the ids of the files new or replaced since
        the last lookup; files gone since drop out."""
        current: dict[Path, tuple[tuple[int, int, int], np.ndarray]] = {}
        for path in self.files():
            try:
                st = path.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                known = self._ids.get(path)
                if known is None or known[0] != stamp:
                    known = (stamp, _hashes(self._read(path, ["song_id"]).column("song_id").to_pylist()))
            except FileNotFoundError:  # pruned between the listing and here
                continue
            current[path] = known
        self._ids = current
        return {path: hashes for path, (_, hashes) in current.items()}

    def _read(self, path: Path, columns: Sequence[str]) -> pa.Table:
        """Every read of an archive file's rows goes through here (a seam the tests count reads at)."""
        return pq.read_table(path, columns=list(columns))


def _hashes(song_ids: Iterable[str]) -> np.ndarray:
    """The song ids' 64-bit BLAKE2b hashes, sorted and unique: stable across processes (unlike ``hash``).
    A collision only costs reading a file that turns out not to hold the song."""
    digests = b"".join(hashlib.blake2b(s.encode(), digest_size=8).digest() for s in song_ids)
    return np.unique(np.frombuffer(digests, dtype="<u8"))


def _holds_any(hashes: np.ndarray, wanted: np.ndarray) -> bool:
    """Whether the sorted ``hashes`` hold any of ``wanted``."""
    if not len(hashes):
        return False
    at = np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)
    return bool(np.any(hashes[at] == wanted))


def _vector(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["vector"], dtype="<f4").astype(np.float32)


def _stored(row: dict[str, Any]) -> StoredEmbedding:
    shape = (int(row["n_layers"]), int(row["layer_dim"]))
    record = EmbeddingRecord(
        song_id=str(row["song_id"]),
        encoder_id=str(row["encoder_id"]),
        layers=np.frombuffer(row["layers"], dtype="<f4").reshape(shape).astype(np.float32),
        vector=_vector(row),
        n_segments=int(row["n_segments"]),
        n_frames=int(row["n_frames"]),
    )
    return StoredEmbedding(seq=int(row["seq"]), key=int(row["key"]), record=record)
