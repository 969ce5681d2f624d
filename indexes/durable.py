"""Durable renames: the one place that syncs a directory after a file in it was created or renamed."""

from __future__ import annotations

import os
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
