"""A/B arms' engagement totals: plays and likes per arm, each event counted once (issue 16, item 9).

One interface, :class:`ArmStore`: the feedback consumer writes through :meth:`~ArmStore.record`,
the API's ``/metrics`` and ``apexrank report arms`` read :meth:`~ArmStore.totals`. Backends are picked
by URL scheme (:func:`open_arm_store`); :class:`NullArmStore` stands for "no arms configured".

Counting: a play adds 1 to plays, a like 1 to likes, an unlike takes 1 from likes; other event types
change nothing. An event id counts at most once per arm within the dedup window, so a replayed or
redelivered batch changes no total.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from indexes.registry import REDIS_SCHEMES, open_backend

__all__ = [
    "ARM_DELTAS",
    "ArmStore",
    "ArmStoreUnavailable",
    "ArmTotals",
    "ArmUpdate",
    "NullArmStore",
    "open_arm_store",
    "register_arm_store",
]

#: Event type -> (plays change, likes change); types not here change nothing and are not sent.
ARM_DELTAS: dict[str, tuple[int, int]] = {"play": (1, 0), "like": (0, 1), "unlike": (0, -1)}


class ArmTotals(NamedTuple):
    """An arm's totals: plays and likes (likes may exceed plays: a like needs no play)."""

    plays: int
    likes: int


@dataclass(frozen=True)
class ArmUpdate:
    """What :meth:`ArmStore.record` did: events counted now, events seen before (replays, duplicates)."""

    applied: int = 0
    seen: int = 0


class ArmStoreUnavailable(Exception):
    """The store's server cannot be reached (a reader such as ``/metrics`` keeps its last figures)."""


class ArmStore(ABC):
    """Per-arm plays and likes, idempotent per (arm, event id); see the module docstring."""

    #: Whether :meth:`record` keeps anything (False for the null store): callers skip the work.
    keeps_state: bool = True

    @abstractmethod
    def record(self, arm_names: Sequence[str], event_ids: Sequence[str], types: Sequence[str]) -> ArmUpdate:
        """Count event ``i`` (``event_ids[i]`` of type ``types[i]``) for arm ``arm_names[i]``, once per
        (arm, event id) within the dedup window. Types outside :data:`ARM_DELTAS` are ignored (neither
        applied nor seen)."""

    @abstractmethod
    def totals(self, arm_names: Iterable[str]) -> dict[str, ArmTotals]:
        """Each arm's totals (zeros for an arm with none), in one round trip. :class:`ArmStoreUnavailable`
        if the server cannot be reached."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


class NullArmStore(ArmStore):
    """No arms configured: records nothing, every total is zero."""

    keeps_state = False

    def record(self, arm_names: Sequence[str], event_ids: Sequence[str], types: Sequence[str]) -> ArmUpdate:
        return ArmUpdate()

    def totals(self, arm_names: Iterable[str]) -> dict[str, ArmTotals]:
        return {arm: ArmTotals(0, 0) for arm in arm_names}


#: URL scheme -> "module:Class" of the backend serving it (imported when first opened).
_BACKENDS: dict[str, str] = dict.fromkeys(REDIS_SCHEMES, "indexes.redis_arms:RedisArmStore")


def register_arm_store(scheme: str, backend: str) -> None:
    """Serve ``scheme://`` URLs with ``backend`` ("module:Class", with ``config_type`` and ``from_config``)."""
    _BACKENDS[scheme.lower()] = backend


def open_arm_store(url: str, **options: Any) -> ArmStore:
    """The arm store for ``url``, chosen by its scheme; the options are validated by the backend's config."""
    store: ArmStore = open_backend("arm store", _BACKENDS, url, options)
    return store
