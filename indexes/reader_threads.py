"""The index readers' concurrency pieces: a read-write lock around FAISS and a periodic daemon thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("indexes.index_reader")


def every(every_s: float, stop: threading.Event, fn: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread calling ``fn`` every ``every_s`` seconds until ``stop``; errors are logged, not raised."""

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                fn()
            except Exception:
                log.exception("%s failed; retrying in %.0fs", name, every_s)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


class ReadWriteLock:
    """Many readers or one writer: FAISS allows concurrent searches, not a search during an add."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def __enter__(self) -> None:  # write side
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
