"""The worker's reader of ``songs.deleted``: a consumer on a thread of its own, in a group of its own.

Every shard must see every takedown, so each worker reads the topic in a group named after
its shard. The consumer runs on its own thread because a Kafka consumer only makes progress
(joins its group, fetches) while it is polled, and the worker's loop cannot afford to block on
a second consumer between batches. The thread hands each polled batch to the worker's loop,
which applies it between two batches of songs (the shard's index has one writer), and commits
the batch only once the loop says it was applied: a crash in between replays it, and removing
a song twice removes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from consumers.loop import Message, RejoinCheck, commit, in_partition_order, message_of

log = logging.getLogger(__name__)


class TakedownFollower:
    """Polls ``songs.deleted`` on a thread; :meth:`take` hands a batch over, :meth:`applied` commits it."""

    def __init__(self, connect: Callable[[RejoinCheck], Any], request_timeout_ms: int, poll_ms: int = 500) -> None:
        self._connect = connect
        self._rejoins = RejoinCheck(None, request_timeout_ms)
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._ready = threading.Event()  # a batch waits for the worker's loop
        self._done = threading.Event()  # ... which applied it
        self._batch: list[Message] = []
        self._thread = threading.Thread(target=self._run, name="takedowns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> list[Message]:
        """The batch waiting to be applied (empty if none); call :meth:`applied` once it is."""
        return list(self._batch) if self._ready.is_set() else []

    def applied(self) -> None:
        self._ready.clear()
        self._done.set()

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._done.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer = None
        try:
            consumer = self._connect(self._rejoins)
            while not self._stop.is_set():
                try:
                    polled = [message_of(r) for r in in_partition_order(consumer.poll(timeout_ms=self._poll_ms))]
                    messages = self._rejoins.reconcile(consumer, polled)
                except Exception:
                    log.exception("reading songs.deleted failed; trying again")
                    self._stop.wait(1.0)
                    continue
                if not messages:
                    continue
                self._rejoins.consumed(messages)
                self._batch = messages
                self._done.clear()
                self._ready.set()
                self._done.wait()
                if self._stop.is_set() and self._ready.is_set():
                    break  # stopped before the batch was applied: not committed, read again next time
                try:
                    commit(consumer)
                except Exception:
                    log.exception("committing songs.deleted failed; the batch will be read again")
        except Exception:
            log.exception("the songs.deleted reader stopped")
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
