"""A/B arms: which arm a user is in, which feed serves them, and which events count for their arm.

Assignment (:func:`assign`) is a pure function of the experiment's name, the user id and the arms'
weights: sha256 of ``"<experiment>\\0<user>"``, its first 53 bits read as a number u in [0, 1), and the
arm whose cumulative weight share first exceeds u. No state: every API process, the feedback
consumer and the report agree, across restarts, without asking anyone. A new ``experiment`` name is a
new salt, so it reshuffles every user independently of the old split. Changing weights moves only
the users whose u falls between the old and the new boundaries; reordering or renaming arms moves
more (docs/arms.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from indexes.arms import ArmStore, ArmUpdate
from ranker.events import Engagement
from ranker.intervals import Z95, wilson
from ranker.settings import Arm, ArmsSettings, Settings

__all__ = ["Z95", "assign", "experiment_feed", "like_rate", "record_arm_events", "resolve", "unit_hash", "wilson"]

_SCALE = float(1 << 53)


def unit_hash(experiment: str, user_id: str) -> float:
    """The user's position in [0, 1) under ``experiment``: uniform, stable, independent across experiments."""
    digest = hashlib.sha256(f"{experiment}\0{user_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / _SCALE


def assign(user_id: str, arms: ArmsSettings) -> Arm | None:
    """The user's arm (None when no arms are configured): each arm gets a share of users equal to its
    weight over the sum of weights."""
    if not arms.arms:
        return None
    point = unit_hash(arms.experiment, user_id) * math.fsum(arm.weight for arm in arms.arms)
    edge = 0.0
    for arm in arms.arms:
        edge += arm.weight
        if point < edge:
            return arm
    return arms.arms[-1]  # rounding at the very top of the range


def experiment_feed(settings: Settings) -> str:
    """The feed whose requests the arms split (``arms.feed``, else the default feed)."""
    return settings.arms.feed or settings.feed.name


def resolve(feed: str | None, user_id: str | None, settings: Settings) -> tuple[str, Arm | None]:
    """The feed that serves a request for ``feed`` (None: the default feed) by ``user_id``, and the user's
    arm. Only a request for the experiment's feed with a user is split; any other is served unchanged."""
    name = feed or settings.feed.name
    if user_id is None or not settings.arms.arms or name != experiment_feed(settings):
        return name, None
    arm = assign(user_id, settings.arms)
    return (name, None) if arm is None else (arm.feed, arm)


def like_rate(plays: int, likes: int) -> float | None:
    """Likes per play, within [0, 1] (a like needs no play, so likes may exceed plays); None without plays."""
    if plays <= 0:
        return None
    return min(1.0, max(0.0, likes / plays))


def record_arm_events(store: ArmStore, events: Sequence[Engagement], settings: Settings) -> ArmUpdate:
    """Count the feedback consumer's new (and replayed) events into their users' arms' totals.

    Skipped: events of users with no arm (no arms configured), and events that name a feed other than
    the experiment's feed or the arm's own feed (engagement elsewhere is not the arm's effect). Events
    that name no feed count. Replays change nothing: the store deduplicates per arm and event id.
    """
    if not events or not store.keeps_state or not settings.arms.arms:
        return ArmUpdate()
    split = experiment_feed(settings)
    arm_names: list[str] = []
    event_ids: list[str] = []
    types: list[str] = []
    for e in events:
        arm = assign(e.user_id, settings.arms)
        if arm is None or (e.feed is not None and e.feed not in (split, arm.feed)):
            continue
        arm_names.append(arm.name)
        event_ids.append(e.event_id)
        types.append(e.type)
    return store.record(arm_names, event_ids, types)
