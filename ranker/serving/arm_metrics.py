"""Per-arm figures: plays, likes, like rate and its 95% Wilson interval, as rows and as Prometheus gauges.

The API's ``/metrics`` calls :func:`refresh_arm_gauges` (one Redis round trip; every API process
exports the same totals, so dashboards take ``max`` over instances); ``apexrank report arms`` prints
:func:`arm_rows`. Labels: experiment (``arms.experiment``: whose totals these are), arm, feed (the policy
serving the arm), model_version ("" when unset).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import Gauge

from indexes.arms import ArmStore, ArmStoreUnavailable
from ranker.serving.arms import like_rate, wilson
from ranker.settings import Settings

__all__ = ["ArmRow", "arm_rows", "refresh_arm_gauges"]

log = logging.getLogger(__name__)

_LABELS = ("experiment", "arm", "feed", "model_version")
ARM_PLAYS = Gauge("apexrank_arm_plays", "Plays by the users of an A/B arm (each event once)", _LABELS)
ARM_LIKES = Gauge("apexrank_arm_likes", "Likes minus unlikes by the users of an A/B arm", _LABELS)
ARM_LIKE_RATE = Gauge("apexrank_arm_like_rate", "An A/B arm's likes per play (NaN without plays)", _LABELS)
ARM_LIKE_RATE_LOW = Gauge("apexrank_arm_like_rate_low", "Lower end of the like rate's 95% Wilson interval", _LABELS)
ARM_LIKE_RATE_HIGH = Gauge("apexrank_arm_like_rate_high", "Upper end of the like rate's 95% Wilson interval", _LABELS)
_GAUGES = (ARM_PLAYS, ARM_LIKES, ARM_LIKE_RATE, ARM_LIKE_RATE_LOW, ARM_LIKE_RATE_HIGH)


@dataclass(frozen=True)
class ArmRow:
    """One arm's figures as configured and counted now."""

    arm: str
    feed: str
    model_version: str | None
    share: float  # the arm's share of users: its weight over the sum of weights
    plays: int
    likes: int
    like_rate: float | None  # None without plays
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arm_rows(store: ArmStore, settings: Settings) -> list[ArmRow]:
    """Every configured arm's figures in the current experiment (``store``'s, made from the same settings), in
    the settings' order (empty when no arms are configured). :class:`~indexes.arms.ArmStoreUnavailable` if the
    store cannot be reached."""
    arms = settings.arms.arms
    if not arms:
        return []
    totals = store.totals(arm.name for arm in arms)
    weight = math.fsum(arm.weight for arm in arms)
    rows = []
    for arm in arms:
        plays, likes = totals[arm.name]
        low, high = wilson(plays, likes)
        rate = like_rate(plays, likes)
        rows.append(ArmRow(arm.name, arm.feed, arm.model_version, arm.weight / weight, plays, likes, rate, low, high))
    return rows


def refresh_arm_gauges(store: ArmStore, settings: Settings) -> bool:
    """Set the per-arm gauges from the store; False (gauges left as they were, a warning logged) when it
    cannot be reached. Arms no longer configured leave the gauges. Blocking: call it off the event loop."""
    try:
        rows = arm_rows(store, settings)
    except ArmStoreUnavailable as exc:
        log.warning("per-arm metrics not refreshed: %s", exc)
        return False
    for gauge in _GAUGES:
        gauge.clear()
    for row in rows:
        labels = (settings.arms.experiment, row.arm, row.feed, row.model_version or "")
        ARM_PLAYS.labels(*labels).set(row.plays)
        ARM_LIKES.labels(*labels).set(row.likes)
        ARM_LIKE_RATE.labels(*labels).set(math.nan if row.like_rate is None else row.like_rate)
        ARM_LIKE_RATE_LOW.labels(*labels).set(row.low)
        ARM_LIKE_RATE_HIGH.labels(*labels).set(row.high)
    return True
