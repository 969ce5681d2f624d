"""Durable renames: the one place that syncs a directory after a file in it was created or renamed."""

from __future__ import annotations

import os
import uuid
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
