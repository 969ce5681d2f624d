"""Fetched stretches of a feed (windows), and the byte-bounded cache that reuses them for a moment."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cachetools import TTLCache

from ranker.serving.batch import SongBatch


@dataclass
class _Window:
    """A stretch of a feed after a cursor: every row passed, the eligible ones' columns, their cosines.

    ``ids`` and ``stored`` are the rows in feed order; ``eligible`` the positions (in ``ids``)
    of those a page may serve (scored, not skipped, inside the age window), in order, and
    ``batch`` their columns (row ``j`` of the batch is ``ids[eligible[j]]``), a copy taken
    from the song table.
    """

    fetched_at: float
    ids: list[str] = field(default_factory=list)
    stored: list[float] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # each row's faiss_id (its cursor skip key's source)
    eligible: list[int] = field(default_factory=list)
    batch: SongBatch | None = None
    exhausted: bool = False
    slot: dict[str, int] = field(default_factory=dict)
    gram: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    #: A personal page's: each batch row's cosine with the listener's taste, NaN outside the taste block.
    cosine: np.ndarray | None = None
    #: A personal page's: the (score, song_id) of the taste block's last row and its songs not yet served
    #: before this page (carried by its cursor).
    block: tuple[float, str, int] | None = None


#: Estimated bytes of one row passed (its id string's header, its place, score and key in the
#: window's lists), of an eligible row's columns beyond the arrays' own bytes (its id and
#: generator in the batch's lists), of a vector slot, and of a window and its cache entry beyond
#: those. From sys.getsizeof on CPython, rounded up: good to some tens of percent.
_ROW_BYTES = 160
_ELIGIBLE_BYTES = 40
_SLOT_BYTES = 100
_WINDOW_BYTES = 1200


def window_nbytes(window: _Window, key: tuple[str, str, int] | None = None) -> int:
    """An estimate of the memory a cached window holds: its arrays plus a per-row estimate."""
    size = _WINDOW_BYTES + int(window.gram.nbytes) + _SLOT_BYTES * len(window.slot)
    size += sum(_ROW_BYTES + len(song_id) for song_id in window.ids)
    batch = window.batch
    if batch is not None:
        arrays = (batch.scores, batch.model_rate, batch.plays, batch.likes, batch.created_ts)
        size += sum(int(a.nbytes) for a in arrays) + _ELIGIBLE_BYTES * len(batch)
    if key is not None:
        size += sum(len(part) for part in key[:2])
    return size


def window_key(feed: str, token: str | None, want: int, filters: int = 0) -> tuple[str, str, int]:
    """A window's cache key: feed, cursor token, rows wanted, and the request filters' tag (``filters``,
    0: none) after the token, so a filtered request never reuses another filter set's window.
    (Tokens are url-safe base64, which has no ``|``.)"""
    return feed, (token or "") + (f"|{filters:016x}" if filters else ""), want


@dataclass(frozen=True, slots=True)
class _Entry:
    window: _Window
    nbytes: int


class PageCache:
    """Fetched feed windows reused for ``ttl_s`` by requests for the same page, within ``max_bytes``.

    Keyed by :func:`window_key`: filtered requests are cached too, each filter set apart. Equal
    filter sets (a client's "this generator only" tab) share windows; a per-listener exclude list
    makes its own entries, which the byte budget evicts like any cold page.

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
