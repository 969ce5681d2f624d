"""Off-policy evaluation: a candidate's like rate on the exploration slots, from the served log.

The logging policy filled each page's exploration slots by Thompson sampling from a pool and
logged, per explored song, its inclusion propensity (the probability the sampler put that song
among the page's explored songs, given the pool). A deterministic candidate, given as a score
per song, would have put the top ``n`` pool songs by its score in those ``n`` slots. Weighting
each explored impression by ``1[song in the candidate's picks] / propensity`` makes the logged
impressions stand for the candidate's; the self-normalised ratio of weighted likes to weighted
plays estimates the candidate's likes per play (docs/off-policy.md).

Pure numpy/pyarrow over the impressions table (``indexes.served_log.impressions``): no store,
no clock, so the CLI, the retrain gate and the loop simulation compute the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.intervals import wilson

#: Below this many matched impressions the estimate is flagged as not enough (docs/off-policy.md,
#: "How much data"): in the tests' world the 95% bootstrap interval covered the truth in 84% of
#: replications at ~16 matches, 92% at ~70 and 93.5-95.5% from ~200 on, where its half-width at
#: a like rate near 0.2 is still about 0.1.
MIN_MATCHED = 200
#: Resamples of the bootstrap interval.
RESAMPLES = 1000
#: Bootstrap cells (resamples x requests) drawn at once: bounds the memory at about 32 MiB.
_CHUNK_CELLS = 1 << 22


@dataclass(frozen=True, slots=True)
class OffPolicyEstimate:
    """A candidate's estimated like rate on the explored slots, its intervals and the data behind it.

    ``value``/``low``/``high`` are NaN when no matched impression was played (nothing to estimate).
    """

    value: float  # self-normalised IPS: sum w*likes / sum w*plays
    low: float  # percentile bootstrap over requests
    high: float
    delta_low: float  # delta-method (linearised ratio, clustered by request)
    delta_high: float
    level: float
    n: int  # explored impressions used
    requests: int  # pages with at least one of them
    matched: int  # of them, in the candidate's picks
    matched_plays: int
    matched_likes: int
    ess: float  # (sum w)^2 / sum w^2 over the explored impressions
    logged_rate: float  # the logging policy's own likes per play on the explored slots
    invalid: int  # explored rows left out: propensity missing or outside (0, 1], or no pool
    min_matched: int
    enough: bool  # matched >= min_matched

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class ExploredSlots:
    """The explored impressions as arrays, with the candidate-independent parts precomputed.

    ``request[i]`` indexes the page of row ``i``; ``pool_request``/``pool_song``/``pool_order``
    flatten each page's pool (one row per pool entry, in the feed's order); songs are codes
    into ``songs``.
    """

    songs: list[str]
    request: np.ndarray  # int64 (n,)
    song: np.ndarray  # int64 (n,)
    propensity: np.ndarray  # float64 (n,)
    plays: np.ndarray  # float64 (n,)
    likes: np.ndarray  # float64 (n,)
    slots: np.ndarray  # int64 (requests,): explored songs on the page
    pool_request: np.ndarray  # int64
    pool_song: np.ndarray  # int64
    pool_order: np.ndarray  # int64: position within the pool
    invalid: int

    @property
    def requests(self) -> int:
        return len(self.slots)

    @classmethod
    def from_impressions(cls, impressions: pa.Table) -> ExploredSlots:
        """The explored rows of an impressions table (columns as ``indexes.served_log.impressions`` writes them)."""
        missing = {"request_id", "song_id", "explored", "propensity", "pool", "plays", "likes"} - set(
            impressions.column_names
        )
        if missing:
            raise ValueError(f"impressions table lacks the column(s) {sorted(missing)}")
        explored = impressions.filter(pc.fill_null(impressions.column("explored"), False))
        prop = pc.fill_null(explored.column("propensity").cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False)
        pool_len = pc.fill_null(pc.list_value_length(explored.column("pool")), 0).to_numpy(zero_copy_only=False)
        valid = (prop > 0.0) & (prop <= 1.0) & (pool_len > 0)  # NaN compares false
        invalid = int(len(valid) - valid.sum())
        if invalid:
            explored = explored.filter(pa.array(valid))
            prop = prop[valid]

        request_codes = pc.dictionary_encode(explored.column("request_id").combine_chunks())
        request = np.asarray(request_codes.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        n_requests = len(request_codes.dictionary)
        slots = np.bincount(request, minlength=n_requests).astype(np.int64)

        # One pool per page: the first explored row's (every explored row of a page logs the same pool).
        first_row = np.full(n_requests, len(request), dtype=np.int64)
        np.minimum.at(first_row, request, np.arange(len(request), dtype=np.int64))
        pools = explored.column("pool").combine_chunks().take(pa.array(first_row))
        pool_request = np.asarray(pc.list_parent_indices(pools).to_numpy(zero_copy_only=False), dtype=np.int64)
        pool_ids = pc.list_flatten(pools)
        starts = np.asarray(pools.offsets.to_numpy(zero_copy_only=False)[:-1], dtype=np.int64)
        pool_order = np.arange(len(pool_request), dtype=np.int64) - starts[pool_request]

        logged_ids = explored.column("song_id").combine_chunks()
        codes = pc.dictionary_encode(pa.concat_arrays([logged_ids.cast(pa.string()), pool_ids.cast(pa.string())]))
        all_codes = np.asarray(codes.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        n = len(request)

        def counts(name: str) -> np.ndarray:
            column = pc.fill_null(explored.column(name), 0)
            return np.asarray(column.to_numpy(), dtype=np.float64)

        plays = counts("plays")
        return cls(
            songs=[str(s) for s in codes.dictionary.to_pylist()],
            request=request,
            song=all_codes[:n],
            propensity=np.asarray(prop, dtype=np.float64),
            plays=plays,
            # A like whose play never arrived (a client that sends only likes, a lost play event) would
            # add to the numerator alone and could push a rate past 1: at most one like per play.
            likes=np.minimum(counts("likes"), plays),
            slots=slots,
            pool_request=pool_request,
            pool_song=all_codes[n:],
            pool_order=pool_order,
            invalid=invalid,
        )

    def picked(self, scores: Mapping[str, float]) -> np.ndarray:
        """Per explored row: is its song among the candidate's top ``slots`` of the page's pool?

        A pool song without a finite score in ``scores`` is one the candidate would not show:
        never picked (the candidate then fills fewer slots). Ties go to the earlier pool entry.
        """
        song_score = np.array([float(scores.get(s, math.nan)) for s in self.songs], dtype=np.float64)
        pool_score = song_score[self.pool_song]
        ok = np.isfinite(pool_score)
        req, song, order, score = self.pool_request[ok], self.pool_song[ok], self.pool_order[ok], pool_score[ok]
        # Within each page: by score, highest first, then by pool order.
        idx = np.lexsort((order, -score, req))
        req, song = req[idx], song[idx]
        first = np.searchsorted(req, req, side="left")
        rank = np.arange(len(req)) - first
        top = rank < self.slots[req]
        width = len(self.songs) + 1
        chosen = req[top] * width + song[top]
        return np.isin(self.request * width + self.song, chosen)


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def resampled_ratios(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, resamples: int, seed: int) -> np.ndarray:
    """``sum(num)/sum(den)`` of each ``(num, den)`` pair over ``resamples`` resamplings of the rows
    (pages) with replacement: shape ``(len(pairs), resamples)``. Every pair sees the same resampled
    rows (paired), and the draws depend only on ``seed`` and the row count. NaN where a resample
    has no denominator (no matched play drawn)."""
    r = len(pairs[0][0]) if pairs else 0
    out = np.full((len(pairs), max(resamples, 0)), math.nan)
    if r == 0 or resamples <= 0:
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // r)
    done = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        while done < resamples:
            k = min(chunk, resamples - done)
            idx = rng.integers(0, r, size=(k, r))
            for j, (num, den) in enumerate(pairs):
                out[j, done : done + k] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
            done += k
    out[~np.isfinite(out)] = math.nan
    return out


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, *, resamples: int, seed: int, level: float
) -> tuple[float, float]:
    """Percentile interval of ``sum(num)/sum(den)`` over resampled rows (pages); resamples without
    a denominator are left out."""
    return _quantiles(resampled_ratios([(num, den)], resamples=resamples, seed=seed)[0], level)


def delta_ratio(num: np.ndarray, den: np.ndarray, level: float) -> tuple[float, float]:
    """Normal interval of ``sum(num)/sum(den)`` with the linearised (delta-method) variance over rows."""
    r = len(num)
    total = float(den.sum())
    if r < 2 or total <= 0:
        return math.nan, math.nan
    value = float(num.sum()) / total
    resid = num - value * den
    se = math.sqrt(r / (r - 1) * float(resid @ resid)) / total
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    return value - z * se, value + z * se


def evaluate_picks(
    impressions: pa.Table,
    scores: Mapping[str, float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    min_matched: int = MIN_MATCHED,
) -> OffPolicyEstimate:
    """Self-normalised IPS estimate of the like rate of the songs ``scores`` would put in the explored slots.

    ``impressions``: the impressions table; ``scores``: the candidate's score per song (higher is
    picked first). To evaluate several candidates on one log, build :class:`ExploredSlots` once
    and call :func:`evaluate_slots`.
    """
    slots = ExploredSlots.from_impressions(impressions)
    return evaluate_slots(slots, scores, resamples=resamples, seed=seed, level=level, min_matched=min_matched)


@dataclass(frozen=True, slots=True)
class _Weighted:
    """One candidate's weights on the explored rows and its per-page weighted likes and plays."""

    matched: np.ndarray
    w: np.ndarray
    num: np.ndarray
    den: np.ndarray


def _weigh(slots: ExploredSlots, scores: Mapping[str, float]) -> _Weighted:
    matched = slots.picked(scores)
    w = np.where(matched, 1.0 / slots.propensity, 0.0)
    r = slots.requests
    num = np.bincount(slots.request, weights=w * slots.likes, minlength=r)
    den = np.bincount(slots.request, weights=w * slots.plays, minlength=r)
    return _Weighted(matched, w, num, den)


def _estimate(
    slots: ExploredSlots, x: _Weighted, ratios: np.ndarray, level: float, min_matched: int
) -> OffPolicyEstimate:
    total_den = float(x.den.sum())
    value = float(x.num.sum()) / total_den if total_den > 0 else math.nan
    low, high = _quantiles(ratios, level) if total_den > 0 else (math.nan, math.nan)
    if total_den > 0 and low == high:  # every resample gives one ratio: no matched play liked, or every one
        # A point would claim certainty from, say, 20 plays without a like: Wilson's interval on the effective
        # number of plays still reaches up to about z^2 / n.
        n = _effective_plays(slots, x)
        low, high = wilson(n, value * n, NormalDist().inv_cdf((1.0 + level) / 2.0)) if n > 0 else (low, high)
    delta_low, delta_high = delta_ratio(x.num, x.den, level)
    sum_w2 = float(x.w @ x.w)
    plays = float(slots.plays.sum())
    n_matched = int(x.matched.sum())
    return OffPolicyEstimate(
        value=value,
        low=low,
        high=high,
        delta_low=delta_low,
        delta_high=delta_high,
        level=level,
        n=len(slots.request),
        requests=slots.requests,
        matched=n_matched,
        matched_plays=int(slots.plays[x.matched].sum()),
        matched_likes=int(slots.likes[x.matched].sum()),
        ess=float(x.w.sum()) ** 2 / sum_w2 if sum_w2 > 0 else 0.0,
        logged_rate=float(slots.likes.sum()) / plays if plays > 0 else math.nan,
        invalid=slots.invalid,
        min_matched=min_matched,
        enough=n_matched >= min_matched,
    )


def _effective_plays(slots: ExploredSlots, x: _Weighted) -> float:
    """Kish's effective number of plays behind the weighted denominator: (sum w p)^2 / sum (w p)^2."""
    wp = x.w * slots.plays
    sq = float(wp @ wp)
    return float(wp.sum()) ** 2 / sq if sq > 0 else 0.0


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def evaluate_slots(
    slots: ExploredSlots,
    scores: Mapping[str, float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    min_matched: int = MIN_MATCHED,
) -> OffPolicyEstimate:
    """:func:`evaluate_picks` on explored slots already read."""
    _check_level(level)
    x = _weigh(slots, scores)
    ratios = resampled_ratios([(x.num, x.den)], resamples=resamples, seed=seed)[0]
    return _estimate(slots, x, ratios, level, min_matched)


@dataclass(frozen=True, slots=True)
class OffPolicyComparison:
    """Two candidates on the same pages: each estimate, and the paired bootstrap interval of
    ``candidate - incumbent`` (the same resampled pages for both, so pages where they pick the
    same songs cancel)."""

    candidate: OffPolicyEstimate
    incumbent: OffPolicyEstimate
    difference: float
    low: float
    high: float
    level: float

    @property
    def better(self) -> bool:
        """Both estimates rest on enough matches and the difference's interval lies above 0."""
        return self.candidate.enough and self.incumbent.enough and self.low > 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None."""

        def number(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "candidate": self.candidate.to_dict(),
            "incumbent": self.incumbent.to_dict(),
            "difference": number(self.difference),
            "low": number(self.low),
            "high": number(self.high),
            "level": self.level,
            "better": self.better,
        }


def compare_slots(
    slots: ExploredSlots,
    candidate: Mapping[str, float],
    incumbent: Mapping[str, float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    min_matched: int = MIN_MATCHED,
) -> OffPolicyComparison:
    """Is ``candidate`` better than ``incumbent`` on these explored slots? Each estimate equals
    :func:`evaluate_slots` with the same seed; the difference is bootstrapped on paired resamples."""
    _check_level(level)
    a, b = _weigh(slots, candidate), _weigh(slots, incumbent)
    ratios = resampled_ratios([(a.num, a.den), (b.num, b.den)], resamples=resamples, seed=seed)
    ca, cb = _estimate(slots, a, ratios[0], level, min_matched), _estimate(slots, b, ratios[1], level, min_matched)
    low, high = _quantiles(ratios[0] - ratios[1], level)
    return OffPolicyComparison(ca, cb, ca.value - cb.value, low, high, level)
