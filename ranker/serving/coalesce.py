"""One run of a slow blocking action at a time, however many requests ask for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from fastapi.concurrency import run_in_threadpool

T = TypeVar("T")


class Coalesced(Generic[T]):
    """Runs ``action`` (blocking, in the thread pool) once per burst of calls: a call while it runs
    waits for the next run, which starts when the running one ends, so every caller gets a run that
    began after its call, and a burst of N calls costs at most two runs and holds no pool thread
    while it waits. Use from one event loop."""

    def __init__(self, action: Callable[[], T]) -> None:
        self._action = action
        self._running: asyncio.Future[T] | None = None
        self._next: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._next is None:
            self._next = asyncio.ensure_future(self._run_after(self._running))
        return await asyncio.shield(self._next)

    async def _run_after(self, previous: asyncio.Future[T] | None) -> T:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own callers'
        self._running, self._next = self._next, None  # later calls wait for a run after this one
        return await run_in_threadpool(self._action)
