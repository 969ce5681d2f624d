"""Fetched stretches of a feed (windows), and the byte-bounded cache that reuses them for a moment."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cachetools import TTLCache

from ranker.serving.policy import (
    SongState,
)


@dataclass
class _Row:
    song_id: str
    stored: float
    state: SongState | None = None  # None: dropped (skipped, not scored, outside the age window)


@dataclass
class _Window:
    """A fetched stretch of a feed: every row read, the eligible ones hydrated, their cosines."""

    fetched_at: float
    rows: list[_Row] = field(default_factory=list)
    eligible: list[_Row] = field(default_factory=list)
    exhausted: bool = False
    slot: dict[str, int] = field(default_factory=dict)
    gram: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))


#: Estimated bytes of one fetched row (the _Row, its id string, its place in the window's lists),
#: of a hydrated row's SongState (seven scores in a dict, the generator, tags, five floats), of a
#: vector slot, and of a window and its cache entry beyond those. From sys.getsizeof on CPython,
#: rounded up: the cache's byte total is an estimate, good to some tens of percent.
_ROW_BYTES = 200
_STATE_BYTES = 650
_SLOT_BYTES = 100
_WINDOW_BYTES = 600


def window_nbytes(window: _Window, key: tuple[str, str, int] | None = None) -> int:
    """An estimate of the memory a cached window holds: its gram matrix plus a per-row estimate."""
    size = _WINDOW_BYTES + int(window.gram.nbytes) + _SLOT_BYTES * len(window.slot)
    for row in window.rows:
        size += _ROW_BYTES + len(row.song_id)
        if row.state is not None:
            size += _STATE_BYTES + sys.getsizeof(row.state.generator) + 60 * len(row.state.tags)
    if key is not None:
        size += sum(len(part) for part in key[:2])
    return size


@dataclass(frozen=True, slots=True)
class _Entry:
    window: _Window
    nbytes: int


class PageCache:
    """Fetched feed windows reused for ``ttl_s`` by requests for the same page, within ``max_bytes``.

    A thin layer over cachetools' ``TTLCache`` sized in bytes (:func:`window_nbytes`
    estimates each entry): an insert first drops every expired entry, then the least
    recently used until the new one fits; a window larger than the whole budget is not
    cached. An entry's expiry is fixed when it is inserted (a hit does not extend it).
    """

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.enabled = ttl_s > 0 and max_bytes > 0
        self._cache: TTLCache[tuple[str, str, int], _Entry] = TTLCache(
            maxsize=max(1, max_bytes), ttl=ttl_s if ttl_s > 0 else 1.0, timer=clock, getsizeof=_entry_size
        )

    @property
    def nbytes(self) -> int:
        """The estimated bytes of the windows held now."""
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: tuple[str, str, int]) -> _Window | None:
        entry = self._cache.get(key)
        return entry.window if entry is not None else None

    def put(self, key: tuple[str, str, int], window: _Window) -> None:
        if not self.enabled:
            return
        self._cache.pop(key, None)
        with contextlib.suppress(ValueError):  # larger than the whole budget: not cached
            self._cache[key] = _Entry(window, window_nbytes(window, key))

    def expire(self) -> int:
        """Drop every expired entry; how many were dropped."""
        return len(self._cache.expire())

    def clear(self) -> None:
        self._cache.clear()


def _entry_size(entry: _Entry) -> int:
    return entry.nbytes
