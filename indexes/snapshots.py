"""Snapshots of a FAISS index over its embedding store: file names, writing, validation and catch-up.

Used by both sides of an index directory: the worker's :class:`~indexes.embedding_index.EmbeddingIndex`
(which writes snapshots) and the API's :class:`~indexes.index_reader.IndexReader` (which only
reads them). Both accept a snapshot on the same checks and catch up from the store the same way.

Directory layout::

    DIR/embeddings.sqlite   the store (source of truth)
    DIR/index.faiss         the FAISS index as of the watermark
    DIR/.lock               advisory lock: one writer per directory
    DIR/index.meta.json     format, watermark, ntotal, dim, factory, sha256 and size of index.faiss,
                            the store's uid (a replaced store invalidates the snapshot), written_at

The snapshot is a cache of the store: its metadata names the last store sequence number
it contains (the watermark), so opening the directory loads the snapshot and replays only
what came after it. A snapshot is used only if its metadata has this code's format, belongs
to this store (uid), is not ahead of it (watermark) nor behind the deletions the store has
pruned (retention: a removal before them can no longer be replayed), and the index file has the
recorded size, sha256 and vector count; otherwise the index is rebuilt from the store.

:func:`write_snapshot` writes both files under temporary names in DIR, fsyncs them, renames
them into place (index first, metadata last) and fsyncs DIR. Any failure before the renames
(a full disk) leaves the previous pair untouched and raises :class:`SnapshotError`. A crash
between the two renames leaves a new index file beside old metadata: the hash no longer
matches, so the next open rebuilds from the store instead of trusting it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from indexes.base import EmbeddingStore, RemovedEmbedding, StoredEmbedding
from indexes.durable import fsync_dir
from indexes.faiss_config import FaissIndexConfig
from indexes.faiss_index import FaissVectorIndex
from indexes.sqlite_embeddings import STORE_FILE as STORE_FILE  # re-exported: where the index files are named
from indexes.sqlite_embeddings import SqliteEmbeddingStore

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.meta.json"
LOCK_FILE = ".lock"
META_FORMAT = 1
REPLAY_BATCH = 4096
_HASH_CHUNK = 1 << 20


class SnapshotError(OSError):
    """Writing a snapshot failed (typically a full disk); the previous snapshot is intact."""


@dataclass(frozen=True)
class LoadedSnapshot:
    index: FaissVectorIndex
    watermark: int  # the last store sequence number the index holds


#: Given a snapshot's (dim, factory), the config to load it with, or why it is refused.
ConfigFor = Callable[[int, str], FaissIndexConfig | str]


def temp_path(final: Path) -> Path:
    """Where a snapshot file is written before its rename (same directory: rename is atomic)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temp_files(directory: Path) -> None:
    for name in (INDEX_FILE, META_FILE):
        for stale in directory.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)


# -- reading ----------------------------------------------------------------------------------------
def load_snapshot(
    directory: Path, store: SqliteEmbeddingStore, config_for: ConfigFor
) -> tuple[LoadedSnapshot | None, str]:
    """The snapshot in ``directory`` and its watermark, or None and why it cannot be used."""
    meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
    if not meta_path.exists():
        return None, f"missing snapshot metadata {meta_path.name}"
    if not index_path.exists():
        return None, f"missing snapshot index file {index_path.name}"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        watermark = int(meta["watermark"])
        digest, size, ntotal = str(meta["sha256"]), int(meta["bytes"]), int(meta["ntotal"])
        dim, factory, fmt = int(meta["dim"]), str(meta["factory"]), int(meta["format"])
        store_uid = int(meta["store_uid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"corrupt snapshot metadata: {exc!r}"
    if fmt != META_FORMAT:
        return None, f"snapshot metadata format {fmt}, expected {META_FORMAT}"
    try:
        config = config_for(dim, factory)
    except ValueError as exc:
        return None, f"corrupt snapshot metadata: {exc}"
    if isinstance(config, str):
        return None, config
    if store_uid != store.store_uid():
        return None, "snapshot belongs to another store file (the store was replaced or restored)"
    if watermark > store.max_seq():
        return None, (
            f"snapshot is ahead of the store (watermark {watermark} > store seq {store.max_seq()}): "
            "the store was replaced or restored"
        )
    pruned = store.deletions_pruned_through()
    if watermark < pruned:
        return None, (
            f"snapshot is behind the store's pruned deletions (watermark {watermark} < {pruned}): "
            "removals it lacks are no longer recorded"
        )
    try:
        actual_size = index_path.stat().st_size
        if actual_size != size:
            return None, f"corrupt snapshot: {index_path.name} has {actual_size} bytes, meta says {size}"
        if sha256_file(index_path) != digest:
            return None, f"corrupt snapshot: sha256 of {index_path.name} does not match its metadata"
        index = FaissVectorIndex.load(config, index_path)
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"corrupt snapshot: {exc}"
    if index.ntotal != ntotal:
        return None, f"corrupt snapshot: index holds {index.ntotal} vectors, meta says {ntotal}"
    return LoadedSnapshot(index, watermark), ""


def catch_up(
    store: EmbeddingStore,
    watermark: int,
    apply: Callable[[list[StoredEmbedding]], int],
    remove: Callable[[list[RemovedEmbedding]], int],
    batch_size: int = REPLAY_BATCH,
) -> int:
    """Hand every store change newer than ``watermark`` to ``apply`` (runs of upserts) or ``remove``
    (runs of deletions), in sequence order and in batches; how many changes they took. ``apply``
    upserts by key and ``remove`` drops keys, so a replay duplicates nothing.

    The caller checks first that ``watermark`` is not behind
    :meth:`~indexes.base.EmbeddingStore.deletions_pruned_through` (removals before it are gone).
    """
    applied = 0
    ups: list[StoredEmbedding] = []
    gone: list[RemovedEmbedding] = []
    for change in store.iter_changes_since(watermark, batch_size=batch_size):
        if isinstance(change, RemovedEmbedding):
            if ups:
                applied += apply(ups)
                ups = []
            gone.append(change)
            if len(gone) >= batch_size:
                applied += remove(gone)
                gone = []
        else:
            if gone:
                applied += remove(gone)
                gone = []
            ups.append(change)
            if len(ups) >= batch_size:
                applied += apply(ups)
                ups = []
    if ups:
        applied += apply(ups)
    if gone:
        applied += remove(gone)
    return applied


# -- writing ----------------------------------------------------------------------------------------
def write_snapshot(
    directory: Path,
    index: FaissVectorIndex,
    watermark: int,
    store_uid: int,
    make_temp_path: Callable[[Path], Path] = temp_path,
) -> dict[str, Any]:
    """Atomically replace the snapshot in ``directory`` with ``index`` as of ``watermark``; its metadata.

    Raises :class:`SnapshotError` and keeps the old snapshot on failure.
    """
    # Buffered (untrained) vectors are not in the file: watermark 0 makes the next open replay them.
    watermark = 0 if index.pending else watermark
    index_path, meta_path = directory / INDEX_FILE, directory / META_FILE
    tmp_index = make_temp_path(index_path)
    tmp_meta = make_temp_path(meta_path)
    renamed = False
    try:
        digest, size = _write_synced(tmp_index, index.write_to)
        meta = {
            "format": META_FORMAT,
            "watermark": watermark,
            "ntotal": index.ntotal - index.pending,
            "dim": index.config.dim,
            "factory": index.config.factory,
            "store_uid": store_uid,
            "trained": index.is_trained,
            "sha256": digest,
            "bytes": size,
            "written_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        body = json.dumps(meta, indent=2).encode("utf-8")
        _write_synced(tmp_meta, lambda write: write(body))
        os.replace(tmp_index, index_path)
        renamed = True
        os.replace(tmp_meta, meta_path)
    except (OSError, RuntimeError) as exc:
        for tmp in (tmp_index, tmp_meta):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        state = (
            "the snapshot pair is torn and the next open rebuilds from the store"
            if renamed
            else "the previous snapshot is intact"
        )
        raise SnapshotError(
            code,
            f"writing the FAISS snapshot in {directory} failed ({exc}); {state}; the store holds every record",
        ) from exc
    try:
        fsync_dir(directory)
    except OSError as exc:  # the new snapshot is in place; only its durability is in doubt
        log.warning("fsync of %s failed after a snapshot: %s", directory, exc)
    return meta


def _write_synced(path: Path, produce: Callable[[Callable[[bytes], Any]], None]) -> tuple[str, int]:
    """Create ``path``, fill it through ``produce(write)``, fsync it; returns (sha256, size)."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "xb") as f:

        def write(chunk: bytes) -> None:
            nonlocal size
            f.write(chunk)
            hasher.update(chunk)
            size += len(chunk)

        produce(write)
        f.flush()
        os.fsync(f.fileno())
    return hasher.hexdigest(), size


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
