"""Listener state: each user's taste vector and the songs they have heard (issue 16, item 1).

One interface, :class:`ListenerStore`, for both concerns: the feedback consumer writes through
:meth:`~ListenerStore.record`, the personal feeds read through :meth:`~ListenerStore.async_reads`
(a user's taste and heard set in one round trip, on the API's event loop); :meth:`~ListenerStore.taste`,
:meth:`~ListenerStore.heard` and :meth:`~ListenerStore.heard_all` are the synchronous reads.
Backends are picked by URL scheme (:func:`open_listener_store`); :class:`NullListenerStore` stands for
"listener state off".

Taste is an exponentially decayed sum S of the L2-normalised song vectors of a user's events,
decayed in event time with half-life h: an event at time t of weight w adds
``w * 2**(-(T - t) / h) * v`` to S kept at time T (the latest event's), and ``|w|`` decayed the
same way to the evidence E. A later event first decays S and E to its own time. The sum is
therefore the same whatever the order the events arrive in. Weights: like +1, skip
``-skip_weight``, unlike -1 (it retracts a like: S moves back and E drops by 1, floored at 0);
plays, completes and shares weigh 0 and only mark the song heard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexes.registry import REDIS_SCHEMES, open_backend

__all__ = [
    "AsyncListenerReads",
    "Listener",
    "ListenerEvent",
    "ListenerStateUnavailable",
    "ListenerStore",
    "ListenerUpdate",
    "NullAsyncListenerReads",
    "NullListenerStore",
    "Taste",
    "open_listener_store",
    "register_listener_store",
    "taste_weight",
]


@dataclass(frozen=True)
class ListenerEvent:
    """One engagement event as listener state sees it."""

    event_id: str
    user_id: str
    song_id: str
    type: str  # an engagement type: play, complete, like, unlike, skip, share
    ts: float  # event time, epoch seconds


@dataclass(frozen=True)
class Taste:
    """A listener's taste: its direction (unit length; None without evidence) and how much evidence stands
    behind it, decayed to the time it was read."""

    vector: np.ndarray | None
    evidence: float
    updated_at: float | None = None  # epoch s of the latest event that moved it; None if none did


@dataclass(frozen=True)
class ListenerUpdate:
    """What :meth:`ListenerStore.record` did: events applied now, events seen before (replays,
    duplicates), and events whose taste weight was lost for want of the song's vector."""

    applied: int = 0
    seen: int = 0
    missing_vectors: int = 0
    taste_updates: int = 0  # applied events that moved a taste (weight != 0, vector known)


def taste_weight(kind: str, skip_weight: float) -> tuple[float, float]:
    """(weight on the taste sum, change of the evidence) of an event type; see the module docstring."""
    if kind == "like":
        return 1.0, 1.0
    if kind == "skip":
        return -skip_weight, skip_weight
    if kind == "unlike":
        return -1.0, -1.0
    return 0.0, 0.0


@dataclass(frozen=True)
class Listener:
    """What a personal feed needs of one user, read together: the taste and the heard songs (newest first)."""

    taste: Taste
    heard: tuple[str, ...] = ()


class ListenerStateUnavailable(Exception):
    """The listener state's store cannot be reached: a caller may serve without it (the API serves
    the cold-start answer) rather than fail."""


class AsyncListenerReads(ABC):
    """The read side of a :class:`ListenerStore` on asyncio (the API's event loop): create it inside the
    loop that uses it (:meth:`ListenerStore.async_reads`) and close it there."""

    @abstractmethod
    async def listener(self, user_id: str, now: float | None = None) -> Listener:
        """The user's taste (evidence decayed to ``now``) and heard set, in one round trip;
        :class:`ListenerStateUnavailable` when the store cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


class NullAsyncListenerReads(AsyncListenerReads):
    """No listener state: every user is new."""

    async def listener(self, user_id: str, now: float | None = None) -> Listener:
        return Listener(Taste(None, 0.0))


class ListenerStore(ABC):
    """Per-user taste and heard set, idempotent per event id (see the module docstring)."""

    #: Whether :meth:`record` keeps anything (False for the null store): callers skip gathering vectors.
    keeps_state: bool = True

    @abstractmethod
    def record(self, events: Sequence[ListenerEvent], vectors: Mapping[str, np.ndarray]) -> ListenerUpdate:
        """Apply ``events`` (each at most once per event id, within the dedup window); ``vectors``: the songs'
        index vectors. An event whose song has no vector still marks it heard and moves no taste."""

    @abstractmethod
    def taste(self, user_ids: Iterable[str], now: float | None = None) -> dict[str, Taste]:
        """Each user's taste (``Taste(None, 0.0)`` for one without), evidence decayed to ``now``; one round trip."""

    @abstractmethod
    def heard(self, user_id: str, song_ids: Sequence[str]) -> set[str]:
        """The songs among ``song_ids`` the user has heard (one round trip)."""

    @abstractmethod
    def heard_all(self, user_id: str) -> list[str]:
        """Every song the user has heard, newest first (at most the store's cap)."""

    @abstractmethod
    def async_reads(self) -> AsyncListenerReads:
        """The read side on asyncio (create it inside the event loop that uses it)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


class NullListenerStore(ListenerStore):
    """Listener state off: records nothing, every user is new."""

    keeps_state = False

    def record(self, events: Sequence[ListenerEvent], vectors: Mapping[str, np.ndarray]) -> ListenerUpdate:
        return ListenerUpdate()

    def taste(self, user_ids: Iterable[str], now: float | None = None) -> dict[str, Taste]:
        return {u: Taste(None, 0.0) for u in user_ids}

    def heard(self, user_id: str, song_ids: Sequence[str]) -> set[str]:
        return set()

    def heard_all(self, user_id: str) -> list[str]:
        return []

    def async_reads(self) -> AsyncListenerReads:
        return NullAsyncListenerReads()


#: URL scheme -> "module:Class" of the backend serving it (imported when first opened).
_BACKENDS: dict[str, str] = dict.fromkeys(REDIS_SCHEMES, "indexes.redis_listeners:RedisListenerStore")


def register_listener_store(scheme: str, backend: str) -> None:
    """Serve ``scheme://`` URLs with ``backend`` ("module:Class", with ``config_type`` and ``from_config``)."""
    _BACKENDS[scheme.lower()] = backend


def open_listener_store(url: str, **options: Any) -> ListenerStore:
    """The listener store for ``url``, chosen by its scheme; the options are validated by the backend's config."""
    store: ListenerStore = open_backend("listener store", _BACKENDS, url, options)
    return store
