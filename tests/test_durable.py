"""The one directory sync that archives, snapshots and model saves share."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from indexes.durable import fsync_dir


def test_a_failed_directory_sync_is_raised_and_closes_its_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync_dir(tmp_path)  # a real directory syncs
    opened: list[int] = []
    real_open, real_close = os.open, os.close

    def open_(path: object, flags: int) -> int:
        fd = real_open(path, flags)  # type: ignore[arg-type]
        opened.append(fd)
        return fd

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "disk gone")

    closed: list[int] = []

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="disk gone"):
        fsync_dir(tmp_path)
    assert opened and closed == opened
