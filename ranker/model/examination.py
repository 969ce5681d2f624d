"""Position-aware evidence: how much attention each page position gets, estimated from the served log.

The click model (docs/ranking.md, "Position-aware evidence"): a play at page position k is liked
with probability ``e_k * r``, ``r`` the song's like rate and ``e_k`` the examination of depth k.
Explored songs are placed at uniformly random positions of their page, so over the explored
impressions the song mix is the same at every position, and their likes per play at k differ only
by ``e_k``. The estimate, per position k < ``max_position`` (deeper positions pooled into the last):

1. ``rate_k = (likes_k + A * fit_k) / (plays_k + A)``: the explored impressions' likes per play,
   shrunk by ``A`` = :data:`PSEUDO_PLAYS` plays towards ``fit_k = r0 (1 + k) ** -eta``, the power law
   fitted to all explored plays by maximum likelihood (one shape parameter, so a few hundred plays
   pin it down where per-position rates are mostly noise; no position effect fits eta = 0, the
   pooled rate): with few plays a position follows the fitted curve, with thousands its own rate.
   (A non-parametric monotone fit, pool-adjacent-violators on the shrunk rates, was tried first: on a
   few hundred plays it steepened the curve, each end taking the extreme of its noise, by 30% on
   average in tests/test_examination.py's world.)
2. divided by the pooled rate, normalised so that the mean weight over every logged play (explored
   or not, by position) is 1, so examined plays total about what plays total and the like-rate
   calibration keeps its scale; then floored at ``floor`` (one play at depth never counts as nearly
   nothing).

Until ``min_impressions`` explored impressions (with at least one liked play) exist, every weight is 1.
Pure numpy and pyarrow; :func:`refresh_examination` stores the result where the feedback consumer
reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexes.base import EngagementCounters
from ranker.settings import ExaminationSettings

#: Pseudo-plays at the pooled rate added to each position's explored plays. At a like rate of 0.15,
#: 20 plays give a standard error of 0.08, half the rate itself: a position with fewer plays than this
#: is mostly noise and is held near the pooled rate; with thousands of plays the shrinkage is negligible.
PSEUDO_PLAYS = 20.0

_NEEDED = ("position", "explored", "plays", "likes")


@dataclass(frozen=True)
class Examination:
    """The estimated weights (``weights[k]``: position k; deeper positions use the last) and what they
    came from."""

    weights: list[float]
    estimated: bool  # False: too little data, every weight is 1
    explored_impressions: int
    explored_plays: int
    explored_likes: int
    plays: int  # every logged play of the table (what the normalisation averages over)
    estimated_at: str  # RFC 3339
    #: Per position: the explored impressions' raw likes per play (None where no plays), for the report.
    raw_rates: list[float | None] = field(default_factory=list)

    def weight(self, position: int | None) -> float:
        """The weight of one play shown at ``position`` (None: unknown, 1)."""
        if position is None or position < 0:
            return 1.0
        return self.weights[min(position, len(self.weights) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_examination(impressions: pa.Table, cfg: ExaminationSettings, now: datetime | None = None) -> Examination:
    """The examination weights from an impressions table (indexes.served_log's ``impressions``: one row
    per served item with its ``position``, ``explored`` flag and the ``plays`` and ``likes`` it got)."""
    missing = [c for c in _NEEDED if c not in impressions.column_names]
    if missing:
        raise ValueError(f"the impressions table lacks the columns {missing}")
    at = (now or datetime.now(UTC)).isoformat()
    n_pos = cfg.max_position
    position = np.asarray(impressions.column("position").fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    bin_ = np.clip(position, 0, n_pos - 1)
    explored = np.asarray(impressions.column("explored").fill_null(False).to_numpy(zero_copy_only=False), np.bool_)
    plays = np.asarray(impressions.column("plays").fill_null(0).to_numpy(zero_copy_only=False), np.float64)
    plays = np.maximum(plays, 0.0)
    likes = np.asarray(impressions.column("likes").fill_null(0).to_numpy(zero_copy_only=False), np.float64)
    likes = np.minimum(np.maximum(likes, 0.0), plays)  # a like without its play says nothing of attention
    all_plays = np.bincount(bin_, weights=plays, minlength=n_pos)
    p_k = np.bincount(bin_[explored], weights=plays[explored], minlength=n_pos)
    l_k = np.bincount(bin_[explored], weights=likes[explored], minlength=n_pos)
    raw = [float(lk / pk) if pk > 0 else None for lk, pk in zip(l_k.tolist(), p_k.tolist(), strict=True)]
    n_explored = int(explored.sum())
    total_p, total_l = float(p_k.sum()), float(l_k.sum())

    def result(weights: list[float], estimated: bool) -> Examination:
        return Examination(
            weights=weights,
            estimated=estimated,
            explored_impressions=n_explored,
            explored_plays=int(total_p),
            explored_likes=int(total_l),
            plays=int(all_plays.sum()),
            estimated_at=at,
            raw_rates=raw,
        )

    if n_explored < cfg.min_impressions or total_l <= 0:
        return result([1.0], estimated=False)
    pooled = total_l / total_p
    fit = power_law_fit(p_k, l_k)
    relative = (l_k + PSEUDO_PLAYS * fit) / (p_k + PSEUDO_PLAYS) / pooled
    weights = _normalise(relative, all_plays, cfg.floor)
    return result([float(w) for w in weights], estimated=True)


#: The shapes ``(1 + k) ** -eta`` the fit chooses among (eta 0: no position effect, to 2: steep).
ETAS = np.linspace(0.0, 2.0, 81)


def power_law_fit(plays: np.ndarray, likes: np.ndarray) -> np.ndarray:
    """Likes per play by position, ``r0 (1 + k) ** -eta``, by maximum likelihood over :data:`ETAS` (the
    binomial likelihood of the likes in the plays; ``r0`` in closed form for each eta)."""
    k = np.arange(len(plays), dtype=np.float64)
    shapes = (1.0 + k)[None, :] ** -ETAS[:, None]  # (etas, positions)
    r0 = likes.sum() / np.maximum(shapes @ plays, 1e-12)
    rates = np.clip(r0[:, None] * shapes, 1e-9, 1.0 - 1e-9)
    loglik = (likes * np.log(rates) + (plays - likes) * np.log1p(-rates)).sum(axis=1)
    return np.asarray(rates[int(np.argmax(loglik))])


def _normalise(relative: np.ndarray, plays: np.ndarray, floor: float) -> np.ndarray:
    """``relative`` scaled so that its mean over ``plays`` (per position) is 1, then floored."""
    total = float(plays.sum())
    mean = float((relative * plays).sum() / total) if total > 0 else float(relative.mean())
    return np.maximum(relative / mean, floor)


def in_window(impressions: pa.Table, days: float, now: datetime) -> pa.Table:
    """The impressions served in the last ``days`` before ``now`` (all of them without a ``served_at``)."""
    if "served_at" not in impressions.column_names or not len(impressions):
        return impressions
    since = pa.scalar(now - timedelta(days=days), pa.timestamp("us", tz="UTC"))
    served = impressions.column("served_at").cast(pa.timestamp("us", tz="UTC"))
    return impressions.filter(pc.fill_null(pc.greater_equal(served, since), False))


def refresh_examination(
    impressions: pa.Table,
    counters: EngagementCounters,
    cfg: ExaminationSettings,
    now: datetime | None = None,
) -> Examination:
    """Estimate the weights from the last ``cfg.window_days`` of ``impressions`` and store them for counting.

    Stored whatever the estimate (all 1 with too little data), so the stored weights always say what the
    recent log supports; the feedback consumers pick them up within ``cfg.refresh_s``.
    """
    now = now or datetime.now(UTC)
    exam = estimate_examination(in_window(impressions, cfg.window_days, now), cfg, now)
    counters.set_examination(exam.weights)
    return exam
