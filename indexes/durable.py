"""Durable renames: the one place that syncs a directory after a file in it was created or renamed,
and the one rule for the temporaries a crash mid-write leaves behind."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the entries just created or renamed in ``directory`` durable (POSIX).

    Raises ``OSError`` when the sync itself fails (the callers decide whether that matters); a
    platform whose directories cannot be opened (Windows) has nothing to sync and returns.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a temporary file beside it, synced, renamed over it,
    the directory synced. Readers (other processes too) see the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def stale(paths: Iterable[Path], older_than_s: float) -> Iterator[Path]:
    """The ``paths`` last modified more than ``older_than_s`` ago (those gone meanwhile skipped). A write
    takes seconds, so a temporary that old is what a crash mid-write left, where a younger one may be
    another process's write in progress: only the age tells them apart."""
    cutoff = time.time() - older_than_s
    for path in paths:
        try:
            if path.lstat().st_mtime < cutoff:
                yield path
        except FileNotFoundError:  # another process removed it first
            continue
