"""Feed policy math: prior like rate, Beta-Binomial posterior, quality, freshness, Thompson sampling.

Pure functions over plain values (no I/O), so the worker, the feedback consumer and
the API compute exactly the same numbers. docs/ranking.md states the formula with a
worked example; in short, for a song with APEX scores ``s``, ``plays`` and ``likes``::

    p0   = clip(c * p0_model, 1e-4, 1 - 1e-4)            prior like rate (c: calibration)
    m    = (w * p0 + likes) / (w + n)                     posterior mean like rate; n: the song's examined
                                                          plays (evidence "position") or its plays ("plain")
    pop  = clip((m - rate_min) / (rate_max - rate_min))   m on the 0-1 scale
    Q    = (W_pop * pop + sum_aes W_t * unit(s_t)) / sum W  quality, 0-1
    score(now) = (FLOOR + Q) * 2 ** (-age_hours / half_life)

and the time-invariant value stored in the feed's sorted set::

    stored = ln(FLOOR + Q) + ln 2 * (created_at - EPOCH) / (3600 * half_life)

``stored`` orders songs exactly as ``score(now)`` does at every ``now`` (the ``now``
term is common to all songs), so no stored score is rewritten as time passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ranker.events import POPULARITY_TASKS
from ranker.settings import FeedPolicy, LikeRatePrior

#: Origin of the stored freshness term (2025-01-01T00:00:00Z). Changing it shifts every
#: stored score of a feed by the same amount: orders stay valid, cursors do not.
EPOCH = 1_735_689_600.0
#: Added to the quality before the logarithm, so a zero-quality song still orders by age.
SCORE_FLOOR = 0.01
RATE_MIN, RATE_MAX = 1e-4, 1.0 - 1e-4
LN2 = math.log(2.0)


@dataclass(frozen=True, slots=True)
class SongState:
    """What the policy needs of one song (read from its Redis hash)."""

    song_id: str
    scores: Mapping[str, float]
    model_rate: float | None  # the model's predicted like rate (target transform); None: fallback
    plays: float
    likes: float
    created_ts: float
    generator: str
    tags: tuple[str, ...] = ()
    duration_s: float | None = None
    #: Plays counted at their positions' examination weights (float32 precision); None: the hash has none
    #: (counted before examined plays existed), and the plays stand in.
    eplays: float | None = None
    #: The model ensemble's spread of ``model_rate`` (its heads' standard deviation); None: a single head.
    prior_sd: float | None = None
    #: The model flagged the song out of its training distribution.
    ood: bool = False


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One song scored by one policy at one instant (what the API explains)."""

    quality: float
    score: float
    freshness: float
    prior_rate: float
    posterior_rate: float
    popularity: float
    contributions: dict[str, float]
    prior_strength: float = 0.0  # the w the posterior used (Policy.strength)


def uncertain(song: SongState) -> bool:
    """The model gave this song a spread or an OOD flag (its explanation has the uncertainty terms)."""
    return song.prior_sd is not None or song.ood


def uncertainty(prior_sd: float | None, ood: bool, w: float) -> dict[str, Any]:
    """The explanation's uncertainty terms, for a song whose model gave a spread or an OOD flag."""
    return {"prior_sd": prior_sd, "ood": ood, "prior_strength": w}


def fallback_like_rate(likes_score: float, cfg: LikeRatePrior) -> float:
    """Without a target transform: the 0-100 likes score mapped linearly onto [rate_min, rate_max]."""
    unit = min(1.0, max(0.0, likes_score / 100.0))
    return cfg.rate_min + (cfg.rate_max - cfg.rate_min) * unit


def calibration_scale(likes: float, expected: float, cfg: LikeRatePrior) -> float:
    """Observed / predicted likes over songs with plays, shrunk towards 1 by a pseudo-count.

    ``c = (likes + s) / (expected + s)`` with ``s = calibration_strength``, clipped to
    [calibration_min, calibration_max]; 1 when calibration is off.
    """
    if not cfg.calibrate:
        return 1.0
    s = cfg.calibration_strength
    if expected + s <= 0:
        return 1.0
    return min(cfg.calibration_max, max(cfg.calibration_min, (likes + s) / (expected + s)))


def posterior_mean(p0: float, likes: float, plays: float, w: float) -> float:
    """Beta-Binomial posterior mean of the like rate: the prior counts as ``w`` plays."""
    return (w * p0 + likes) / (w + plays)


def beta_params(p0: float, likes: float, plays: float, w: float) -> tuple[float, float]:
    """Beta(w*p0 + likes, w*(1-p0) + plays - likes); likes beyond plays count as no misses."""
    return w * p0 + likes, w * (1.0 - p0) + max(plays - likes, 0.0)


def parse_tags(value: str | None) -> tuple[str, ...]:
    """Tags as the worker writes them (comma-joined) or as a JSON list."""
    if not value:
        return ()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            return ()
        return tuple(str(t) for t in items) if isinstance(items, list) else ()
    return tuple(t.strip() for t in value.split(",") if t.strip())


def tags_match(song_tags: Collection[str], wanted: frozenset[str], mode: str = "any") -> bool:
    """What a tag filter means, for the feeds' configured filters and request-time ones alike:
    ``any``: the song has at least one of ``wanted``; ``all``: every one of them. Empty ``wanted``: true."""
    if not wanted:
        return True
    if mode == "all":
        return wanted.issubset(song_tags)
    return not wanted.isdisjoint(song_tags)


def to_timestamp(value: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 time (naive times are taken as UTC); None if unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC).timestamp()
    return parsed.timestamp()


def explore_slots(limit: int, share: float) -> int:
    """Exploration slots on a page of ``limit``: round(limit * share), leaving one exploit slot."""
    if share <= 0 or limit < 2:
        return 0
    return min(int(limit * share + 0.5), limit - 1)


class Policy:
    """A :class:`~ranker.settings.FeedPolicy` compiled for fast evaluation."""

    def __init__(
        self, name: str, config: FeedPolicy, like_rate: LikeRatePrior, factors: Mapping[str, float] | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.like_rate = like_rate
        #: Each generator's factor on the calibration scale (retrain's fit; absent: 1). The mapping is the
        #: reader's or writer's, shared by its policies and refreshed in place with the scale.
        self.factors: Mapping[str, float] = {} if factors is None else factors
        weights = config.weights
        total = sum(weights.values())
        self.pop_weight = sum(weights.get(t, 0.0) for t in POPULARITY_TASKS) / total
        self.aesthetic = [(t, w / total) for t, w in weights.items() if t not in POPULARITY_TASKS and w > 0]
        self.w = config.prior_strength
        #: Per-song prior strength (docs/ranking.md, "Uncertain priors"): never above w, never below this.
        self.w_floor = min(self.w, config.prior_strength_min)
        self.uncertain_prior = config.uncertain_prior
        self.ood_factor = config.ood_prior_factor
        #: Evidence "position": the posterior counts examined plays, where a play at depth counts less.
        self.position_aware = config.evidence == "position"
        hl = config.half_life_hours
        self.decay = LN2 / (3600.0 * hl) if hl else 0.0  # 0 or None: no decay
        self._rate_span = like_rate.rate_max - like_rate.rate_min
        f = config.filters
        self._gen_in = frozenset(f.generators_include)
        self._gen_out = frozenset(f.generators_exclude)
        self._tags_any = frozenset(f.tags_any)
        self._tags_out = frozenset(f.tags_exclude)
        self.min_age_s = f.min_age_hours * 3600.0
        self.max_age_s = f.max_age_hours * 3600.0 if f.max_age_hours is not None else None

    # -- the prior and the posterior ---------------------------------------------------------
    def evidence(self, song: SongState) -> float:
        """The plays the posterior counts: examined plays when position-aware (the plays if the song has none)."""
        if self.position_aware and song.eplays is not None:
            return song.eplays
        return song.plays

    def strength(self, song: SongState, p0: float, scale: float = 1.0) -> float:
        """w for this song: the policy's, lowered where the model is unsure of ``p0``.

        With a spread s (the ensemble's, times the calibration ``scale`` as p0 is), the Beta prior's
        variance p0 (1 - p0) / (w + 1) is made at least s^2: w = p0 (1 - p0) / s^2 - 1. An OOD song's
        w is then times ``ood_prior_factor``. Always within [min(w, prior_strength_min), w]."""
        w = self.w
        sd = song.prior_sd
        scale = self.song_scale(song, scale)
        if self.uncertain_prior and sd is not None and sd * scale > 0.0:
            s = sd * scale
            w = min(self.w, max(self.w_floor, p0 * (1.0 - p0) / (s * s) - 1.0))
        if song.ood and self.ood_factor < 1.0:
            w = min(self.w, max(self.w_floor, w * self.ood_factor))
        return w

    def prior_rate(self, song: SongState, scale: float = 1.0) -> float:
        """p0: the model's like rate (or the fallback from the likes score), calibrated and clipped."""
        raw = song.model_rate
        if raw is None:
            raw = fallback_like_rate(song.scores.get("likes", 0.0), self.like_rate)
        return min(RATE_MAX, max(RATE_MIN, raw * self.song_scale(song, scale)))

    def song_scale(self, song: SongState, scale: float) -> float:
        """The calibration scale of this song: the global one times its generator's factor (if it has one)."""
        factor = self.factors.get(song.generator) if self.factors else None
        return scale if factor is None else scale * factor

    def popularity(self, rate: float) -> float:
        """A like rate on the 0-1 scale: the inverse of the fallback mapping, clipped."""
        return min(1.0, max(0.0, (rate - self.like_rate.rate_min) / self._rate_span))

    def parts(self, song: SongState, rate: float) -> tuple[float, dict[str, float]]:
        """The quality (0-1) and each term's share of it (they add up to it): the explanation.

        Quality is the weighted mean of the popularity of ``rate`` and the unit aesthetic
        scores; an aesthetic score missing from the song is left out and the rest renormalised.
        """
        parts = {"popularity": self.pop_weight * self.popularity(rate)}
        norm = self.pop_weight
        scores = song.scores
        for task, weight in self.aesthetic:
            value = scores.get(task)
            if value is not None:  # unit_score of a 1-5 task, inlined: this runs per song per request
                unit = (value - 1.0) * 0.25
                parts[task] = weight * (0.0 if unit < 0.0 else 1.0 if unit > 1.0 else unit)
                norm += weight
        if norm <= 0:
            return 0.0, parts
        if abs(norm - 1.0) > 1e-12:
            parts = {k: v / norm for k, v in parts.items()}
        return sum(parts.values()), parts

    def quality(self, song: SongState, rate: float) -> float:
        return self.parts(song, rate)[0]

    def contributions(self, song: SongState, rate: float) -> dict[str, float]:
        return self.parts(song, rate)[1]

    # -- time ----------------------------------------------------------------------------------
    def freshness(self, created_ts: float, now: float) -> float:
        """2^(-age / half-life); 1 without a half-life."""
        return math.exp(-self.decay * (now - created_ts)) if self.decay else 1.0

    def stored_score(self, quality: float, created_ts: float) -> float:
        """The time-invariant sorted-set score (see the module docstring)."""
        return math.log(SCORE_FLOOR + quality) + self.decay * (created_ts - EPOCH)

    def served_score(self, stored: float, now: float) -> float:
        """``(FLOOR + Q) * freshness`` at ``now``, recovered from a stored score."""
        return math.exp(stored - self.decay * (now - EPOCH))

    # -- everything at once ----------------------------------------------------------------------
    def evaluate(self, song: SongState, scale: float, now: float) -> Evaluation:
        p0 = self.prior_rate(song, scale)
        w = self.strength(song, p0, scale)
        m = posterior_mean(p0, song.likes, self.evidence(song), w)
        q, parts = self.parts(song, m)
        fresh = self.freshness(song.created_ts, now)
        return Evaluation(
            quality=q,
            score=(SCORE_FLOOR + q) * fresh,
            freshness=fresh,
            prior_rate=p0,
            posterior_rate=m,
            popularity=self.popularity(m),
            contributions=parts,
            prior_strength=w,
        )

    def sampled_score(self, song: SongState, rate: float, now: float) -> float:
        """The score with a sampled like rate in place of the posterior mean (exploration)."""
        return (SCORE_FLOOR + self.quality(song, rate)) * self.freshness(song.created_ts, now)

    def explain(self, song: SongState, ev: Evaluation, now: float) -> dict[str, Any]:
        """The components of a score, for API responses."""
        return {
            "quality": ev.quality,
            "freshness": ev.freshness,
            "age_hours": (now - song.created_ts) / 3600.0,
            "contributions": ev.contributions,
            "prior_rate": ev.prior_rate,
            "posterior_rate": ev.posterior_rate,
            "plays": song.plays,
            **({"examined_plays": self.evidence(song)} if self.position_aware else {}),
            "likes": song.likes,
            **(uncertainty(song.prior_sd, song.ood, ev.prior_strength) if uncertain(song) else {}),
        }

    def sample_rates(self, songs: Sequence[SongState], scale: float, rng: np.random.Generator) -> np.ndarray:
        """Thompson sampling: one like rate per song drawn from its Beta posterior."""
        if not songs:
            return np.empty(0)
        params = []
        for s in songs:
            p0 = self.prior_rate(s, scale)
            params.append(beta_params(p0, s.likes, self.evidence(s), self.strength(s, p0, scale)))
        a = np.fromiter((p[0] for p in params), dtype=np.float64, count=len(params))
        b = np.fromiter((p[1] for p in params), dtype=np.float64, count=len(params))
        return rng.beta(a, b)

    # -- membership ----------------------------------------------------------------------------
    def admits(self, song: SongState) -> bool:
        """The write-time filters: generator, tags, duration."""
        if self._gen_in and song.generator not in self._gen_in:
            return False
        if song.generator in self._gen_out:
            return False
        if not tags_match(song.tags, self._tags_any):
            return False
        if self._tags_out and not self._tags_out.isdisjoint(song.tags):
            return False
        min_duration = self.config.filters.min_duration_s
        return min_duration is None or (song.duration_s is not None and song.duration_s >= min_duration)

    def in_age_window(self, created_ts: float, now: float) -> bool:
        """The read-time filter: min_age_hours <= age (< max_age_hours)."""
        age = now - created_ts
        return age >= self.min_age_s and (self.max_age_s is None or age < self.max_age_s)


def compile_policies(
    feeds: Mapping[str, FeedPolicy], like_rate: LikeRatePrior, factors: Mapping[str, float] | None = None
) -> dict[str, Policy]:
    """The feeds' policies, sharing ``factors`` (each generator's calibration factor) if given."""
    return {name: Policy(name, config, like_rate, factors) for name, config in feeds.items()}


def refresh(factors: dict[str, float], latest: Mapping[str, float]) -> None:
    """Replace ``factors``' contents in place (the policies sharing it see the new ones)."""
    if factors != latest:
        factors.clear()
        factors.update(latest)


def generator_factors(
    generators: Sequence[str], plays: np.ndarray, likes: np.ndarray, p0: np.ndarray, cfg: LikeRatePrior
) -> dict[str, float]:
    """Each generator's factor on the global calibration scale, shrunk toward 1 by its evidence.

    ``p0``: each played song's prior as served, uncalibrated (the model's rate, or the fallback). The
    global scale is c = (L + s) / (E + s) over all songs (L likes, E = sum of plays x p0; s =
    ``calibration_strength``); a generator's own is c_g = (L_g + k c) / (E_g + k) with k =
    ``generator_calibration_strength``: the posterior mean of its rate ratio under a Gamma prior
    centred on c, worth k predicted likes. The factor is c_g / c, clipped as the scale is."""
    if not len(generators):
        return {}
    expected = plays * p0
    s, k = cfg.calibration_strength, cfg.generator_calibration_strength
    total_e = float(expected.sum())
    if total_e + s <= 0:
        return {}
    c = (float(likes.sum()) + s) / (total_e + s)
    names, codes = np.unique(np.asarray(generators, dtype=object), return_inverse=True)
    e_g = np.bincount(codes, weights=expected, minlength=len(names))
    l_g = np.bincount(codes, weights=likes, minlength=len(names))
    out: dict[str, float] = {}
    for name, lg, eg in zip(names.tolist(), l_g.tolist(), e_g.tolist(), strict=True):
        if eg + k <= 0:
            continue
        factor = (lg + k * c) / (eg + k) / c
        out[str(name)] = min(cfg.calibration_max, max(cfg.calibration_min, factor))
    return out
