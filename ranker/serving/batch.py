"""Many songs at once: a columnar batch read straight from hash fields, and the policy over it in numpy.

:class:`SongBatch` holds what :class:`~ranker.serving.policy.SongState` holds, one array per
field over N songs, built from the rows ``reads.read_fields(ids, READ_FIELDS or WRITE_FIELDS)``
returns without a SongState per song. :func:`evaluate` computes, for a
:class:`~ranker.serving.policy.Policy`, what ``Policy.evaluate`` computes per song (prior and
posterior like rate, quality and its parts, freshness, score) for the whole batch.

Both mirror the scalar code operation for operation, in float64, so the numbers are the
same to the last bit on the Python this runs on (tests/test_rank_equivalence.py holds them
to it against the per-song reference):

- parsing is :func:`~ranker.serving.state.state_from_fields`: Python's ``float`` on every
  field (``"inf"``, ``"nan"`` and unparseable text give the field's default), the creation
  time is :func:`~ranker.serving.state.created_ts` capped at ``now``, a song with no score
  field is not scored;
- Python's ``min``/``max`` keep their first argument unless the second compares strictly
  smaller/greater (a NaN never replaces it): ``np.where`` with the same comparison, not
  ``np.clip``, which propagates NaN;
- the freshness exponential is ``math.exp`` (numpy's own ``exp`` can differ by an ulp);
- the quality is the builtin ``sum`` over the parts in the scalar code's order (plain
  left-to-right addition before Python 3.12, Neumaier's compensated sum from 3.12 on).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat

import numpy as np

from indexes.redis_schema import flag
from ranker.events import TASKS
from ranker.serving.policy import EPOCH, RATE_MAX, RATE_MIN, SCORE_FLOOR, Policy, parse_tags, tags_match, to_timestamp
from ranker.serving.state import _N_READ, _N_TASKS, _N_WRITE, F32_MAX, _float

_LIKES = TASKS.index("likes")
_COMPENSATED_SUM = sys.version_info >= (3, 12)  # builtin sum() of floats: Neumaier summation from 3.12


# -- parsing -------------------------------------------------------------------------------------
def _floats(column: Sequence[str | None], default: float) -> np.ndarray:
    """:func:`~ranker.serving.state._float` of every value (non-finite or unparseable: ``default``);
    NaN where the field is absent (None)."""
    n = len(column)
    try:  # the usual case: every value present and a number
        out = np.fromiter(map(float, column), np.float64, n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        present = np.fromiter((v is not None for v in column), np.bool_, n)
        values = [v for v in column if v is not None]
        try:
            parsed = np.fromiter(map(float, values), np.float64, len(values))
        except ValueError:
            parsed = np.fromiter((_float(v, default) for v in values), np.float64, len(values))
        out = np.full(n, np.nan)
        out[present] = np.where(np.isfinite(parsed), parsed, default)
        return out
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = default
    return out


def _spreads(column: Sequence[str | None]) -> np.ndarray:
    """:func:`~ranker.serving.state.spread` of each value: NaN where absent or unreadable, else ``max(0, x)``."""
    out = _floats(column, math.nan)
    return np.where(out > 0.0, out, np.where(np.isnan(out), np.nan, 0.0))


def _timestamps(column: Sequence[str | None], memo: dict[str | None, float]) -> np.ndarray:
    """:func:`~ranker.serving.policy.to_timestamp` of each value; NaN where it is None (unreadable)."""
    for v in column:
        if v not in memo:
            ts = to_timestamp(v)
            memo[v] = math.nan if ts is None else ts
    return np.fromiter(map(memo.__getitem__, column), np.float64, len(column))


@dataclass(eq=False)
class SongBatch:
    """N songs as columns (row ``i`` is ``song_ids[i]``), parsed as :func:`state_from_fields` parses.

    ``scored[i]`` is False where ``state_from_fields`` gives None (no score field): that row's
    other columns hold whatever parsing the absent fields gives and mean nothing.
    """

    song_ids: list[str]
    scores: np.ndarray  # (N, 7) in TASKS order; NaN where the field is absent
    scored: np.ndarray  # bool (N,): any score field present
    model_rate: np.ndarray  # NaN where absent (the fallback mapping applies)
    plays: np.ndarray
    likes: np.ndarray
    created_ts: np.ndarray
    generators: list[str]
    #: Examined plays (:func:`~ranker.serving.state.examined_plays`: float32 values); NaN where the hash has none.
    eplays: np.ndarray | None = None
    #: The ensemble's spread of the model's like rate (:func:`~ranker.serving.state.spread`); NaN where absent.
    prior_sd: np.ndarray | None = None
    ood: np.ndarray | None = None  # bool: flagged out of the model's training distribution
    raw_tags: list[str | None] | None = None  # WRITE_FIELDS only
    duration_s: np.ndarray | None = None  # WRITE_FIELDS only; NaN where absent
    model_versions: list[str] | None = None  # TABLE_FIELDS only
    untrained: np.ndarray | None = None  # bool; TABLE_FIELDS rows and the song table's batches

    def __len__(self) -> int:
        return len(self.song_ids)

    @classmethod
    def from_fields(
        cls, song_ids: Sequence[str], values: Sequence[Sequence[str | None]], now: float | None = None
    ) -> SongBatch:
        """From READ_FIELDS (or WRITE_FIELDS) rows; ``now`` caps creation times as reads do."""
        n = len(song_ids)
        if len(values) != n:
            raise ValueError(f"{n} song ids but {len(values)} rows of fields")
        width = len(values[0]) if n else _N_READ
        columns: list[Sequence[str | None]] = list(zip(*values, strict=True)) if n else [()] * width
        scores = np.empty((n, _N_TASKS))
        for t in range(_N_TASKS):
            scores[:, t] = _floats(columns[t], 0.0)
        prior, plays, likes, created_at, generator, scored_at, eplays, prior_sd, ood = columns[_N_TASKS:_N_READ]
        plays_v = _floats(plays, 0.0)
        likes_v = _floats(likes, 0.0)
        eplays_v = _floats(eplays, 0.0)  # NaN: absent
        eplays_v = np.where(eplays_v > 0.0, np.minimum(eplays_v, F32_MAX), np.where(np.isnan(eplays_v), np.nan, 0.0))
        # created_ts(created_at, scored_at), then capped at now
        memo: dict[str | None, float] = {None: math.nan}
        created = _timestamps(created_at, memo)
        scored_ts = _timestamps(scored_at, memo)
        bound = np.where(np.isfinite(scored_ts), scored_ts, EPOCH)
        created = np.where(np.isfinite(created), np.where(bound < created, bound, created), bound)
        if now is not None:
            created = np.where(created > now, now, created)
        batch = cls(
            song_ids=list(song_ids),
            scores=scores,
            scored=np.asarray(~np.isnan(scores).all(axis=1)),
            model_rate=_floats(prior, 0.0),
            plays=np.where(plays_v > 0.0, plays_v, 0.0),  # max(0.0, x): NaN (absent) -> 0.0
            likes=np.where(likes_v > 0.0, likes_v, 0.0),
            created_ts=created,
            generators=[g or "" for g in generator],
            eplays=eplays_v.astype(np.float32).astype(np.float64),
            prior_sd=_spreads(prior_sd),
            ood=np.fromiter(map(flag, ood), np.bool_, n),
        )
        if width > _N_READ:
            batch.raw_tags = list(columns[_N_READ])
            batch.duration_s = _floats(columns[_N_READ + 1], 0.0)
        if width > _N_WRITE:
            version, untrained = columns[_N_WRITE : _N_WRITE + 2]
            batch.model_versions = [v or "" for v in version]
            batch.untrained = np.fromiter(map(flag, untrained), np.bool_, n)
        return batch

    def take(self, rows: np.ndarray) -> SongBatch:
        """These rows (indices into this batch), in that order, as a batch of their own."""
        ids = self.song_ids
        idx = rows.tolist()
        out = SongBatch(
            song_ids=[ids[i] for i in idx],
            scores=self.scores[rows],
            scored=self.scored[rows],
            model_rate=self.model_rate[rows],
            plays=self.plays[rows],
            likes=self.likes[rows],
            created_ts=self.created_ts[rows],
            generators=[self.generators[i] for i in idx],
            eplays=None if self.eplays is None else self.eplays[rows],
            prior_sd=None if self.prior_sd is None else self.prior_sd[rows],
            ood=None if self.ood is None else self.ood[rows],
        )
        if self.raw_tags is not None:
            out.raw_tags = [self.raw_tags[i] for i in idx]
        if self.duration_s is not None:
            out.duration_s = self.duration_s[rows]
        if self.model_versions is not None:
            out.model_versions = [self.model_versions[i] for i in idx]
        if self.untrained is not None:
            out.untrained = self.untrained[rows]
        return out

    @cached_property
    def tags(self) -> list[tuple[str, ...]]:
        """Each song's tags (:func:`~ranker.serving.policy.parse_tags`); empty without WRITE_FIELDS."""
        if self.raw_tags is None:
            return [()] * len(self)
        return [parse_tags(v) for v in self.raw_tags]

    @cached_property
    def generator_codes(self) -> tuple[list[str], np.ndarray]:
        """The distinct generators, and each song's index into them."""
        names, codes = np.unique(np.asarray(self.generators, dtype=object), return_inverse=True)
        return [str(g) for g in names], codes.reshape(-1)


# -- the policy over a batch ------------------------------------------------------------------------
def _max(a: float, x: np.ndarray) -> np.ndarray:
    """Python's ``max(a, x)`` per element: ``x`` only where it is greater (never NaN for a non-NaN ``a``)."""
    return np.where(x > a, x, a)


def _min(a: float, x: np.ndarray) -> np.ndarray:
    """Python's ``min(a, x)`` per element."""
    return np.where(x < a, x, a)


def builtin_sum(terms: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """Per element, what ``sum()`` gives over the terms present there, in order (``None``: always present).

    The first term must always be present (``sum`` starts from the int 0 and adds it as ``0 + x``).
    """
    first, always = terms[0]
    if always is not None:
        raise ValueError("the first term must always be present")
    total = 0.0 + first
    if not _COMPENSATED_SUM:
        for x, present in terms[1:]:
            total = total + x if present is None else np.where(present, total + x, total)
        return total
    comp = np.zeros_like(total)
    for x, present in terms[1:]:
        t = total + x
        c = np.where(np.abs(total) >= np.abs(x), (total - t) + x, (x - t) + total)
        if present is None:
            comp, total = comp + c, t
        else:
            comp, total = np.where(present, comp + c, comp), np.where(present, t, total)
    return np.where((comp != 0) & np.isfinite(comp), total + comp, total)


@dataclass
class BatchEvaluation:
    """:class:`~ranker.serving.policy.Evaluation` of every song of a batch, as arrays."""

    quality: np.ndarray
    score: np.ndarray
    freshness: np.ndarray
    prior_rate: np.ndarray
    posterior_rate: np.ndarray
    popularity: np.ndarray
    #: The plays the posterior counted (:func:`evidence`) when the policy is position-aware; None when plain.
    examined_plays: np.ndarray | None
    #: ``(name, values, present)`` in the order of the contributions dict: "popularity" (always
    #: present), then the policy's aesthetic tasks; ``present`` None where every song has it.
    contributions: list[tuple[str, np.ndarray, np.ndarray | None]]
    #: The w the posterior used per song (:func:`strength`; the policy's, a float, where no song is uncertain).
    prior_strength: np.ndarray | float = 0.0


def prior_rate(policy: Policy, batch: SongBatch, song_scale: np.ndarray | float = 1.0) -> np.ndarray:
    """``Policy.prior_rate`` per song: the model's rate or the fallback, times its calibration scale
    (``song_scale``: :func:`row_scale`'s), clipped."""
    cfg = policy.like_rate
    likes_score = batch.scores[:, _LIKES]
    likes_score = np.where(np.isnan(likes_score), 0.0, likes_score)  # scores.get("likes", 0.0)
    unit = _min(1.0, _max(0.0, likes_score / 100.0))
    fallback = cfg.rate_min + (cfg.rate_max - cfg.rate_min) * unit
    raw = np.where(np.isnan(batch.model_rate), fallback, batch.model_rate)
    return _min(RATE_MAX, _max(RATE_MIN, raw * song_scale))


def row_scale(policy: Policy, batch: SongBatch, scale: float) -> np.ndarray | float:
    """``Policy.song_scale`` per song (the global ``scale``, a float, while no generator has a factor)."""
    factors = policy.factors
    if not factors:
        return scale
    got = np.fromiter(map(factors.get, batch.generators, repeat(math.nan)), np.float64, len(batch))
    return np.where(np.isnan(got), scale, scale * got)


def evidence(policy: Policy, batch: SongBatch) -> np.ndarray:
    """``Policy.evidence`` per song: examined plays when position-aware (the plays where a song has none)."""
    if not policy.position_aware or batch.eplays is None:
        return batch.plays
    return np.where(np.isnan(batch.eplays), batch.plays, batch.eplays)


def strength(
    policy: Policy, batch: SongBatch, p0: np.ndarray, song_scale: np.ndarray | float = 1.0
) -> np.ndarray | float:
    """``Policy.strength`` per song (the policy's w, a float, where no song has a spread or an OOD flag);
    ``song_scale``: :func:`row_scale`'s, as :func:`prior_rate` was given."""
    sd, ood = batch.prior_sd, batch.ood
    spread = policy.uncertain_prior and sd is not None and bool((sd * song_scale > 0.0).any())
    flagged = policy.ood_factor < 1.0 and ood is not None and bool(ood.any())
    if not spread and not flagged:
        return policy.w
    w = np.full(len(batch), policy.w)
    with np.errstate(all="ignore"):
        if spread:
            assert sd is not None
            s = sd * song_scale
            has = s > 0.0
            w = np.where(has, _min(policy.w, _max(policy.w_floor, p0 * (1.0 - p0) / (s * s) - 1.0)), w)
        if flagged:
            assert ood is not None
            w = np.where(ood, _min(policy.w, _max(policy.w_floor, w * policy.ood_factor)), w)
    return w


def posterior_rate(
    policy: Policy,
    p0: np.ndarray,
    batch: SongBatch,
    plays: np.ndarray | None = None,
    w: np.ndarray | float | None = None,
) -> np.ndarray:
    """``posterior_mean(p0, likes, evidence, w)`` (``plays``: :func:`evidence`, computed here if not given;
    ``w``: :func:`strength`, the policy's w if not given)."""
    w = policy.w if w is None else w
    return (w * p0 + batch.likes) / (w + (evidence(policy, batch) if plays is None else plays))


def popularity(policy: Policy, rate: np.ndarray) -> np.ndarray:
    """``Policy.popularity``."""
    return _min(1.0, _max(0.0, (rate - policy.like_rate.rate_min) / policy._rate_span))


def parts(
    policy: Policy, batch: SongBatch, rate: np.ndarray
) -> tuple[np.ndarray, list[tuple[str, np.ndarray, np.ndarray | None]]]:
    """``Policy.parts``: the quality and its terms (a term absent for a song is not in its dict)."""
    terms: list[tuple[str, np.ndarray, np.ndarray | None]] = [
        ("popularity", policy.pop_weight * popularity(policy, rate), None)
    ]
    norm = np.full(len(batch), policy.pop_weight)
    for task, weight in policy.aesthetic:
        value = batch.scores[:, TASKS.index(task)]
        present = ~np.isnan(value)
        unit = (value - 1.0) * 0.25
        terms.append((task, weight * np.where(unit < 0.0, 0.0, np.where(unit > 1.0, 1.0, unit)), present))
        norm = np.where(present, norm + weight, norm)
    scaled = np.abs(norm - 1.0) > 1e-12
    positive = ~(norm <= 0)
    renorm = scaled & positive  # parts are divided only when the quality is not 0 by the floor rule
    if renorm.any():
        terms = [(name, np.where(renorm, v / norm, v), present) for name, v, present in terms]
    quality = builtin_sum([(v, present) for _, v, present in terms])
    quality = np.where(positive, quality, 0.0)
    terms = [(name, v, None if present is None or present.all() else present) for name, v, present in terms]
    return quality, terms


def freshness(policy: Policy, created_ts: np.ndarray, now: float) -> np.ndarray:
    """``Policy.freshness``: ``math.exp(-decay * age)``, 1 without a half-life."""
    if not policy.decay:
        return np.ones(len(created_ts))
    exponent = -policy.decay * (now - created_ts)
    return np.fromiter(map(math.exp, exponent.tolist()), np.float64, len(exponent))


def evaluate(policy: Policy, batch: SongBatch, scale: float, now: float) -> BatchEvaluation:
    """``Policy.evaluate`` of every song of the batch."""
    with np.errstate(all="ignore"):  # Python's float arithmetic gives inf and NaN silently too
        song_scale = row_scale(policy, batch, scale)  # once: the prior and its strength both use it
        p0 = prior_rate(policy, batch, song_scale)
        n = evidence(policy, batch)
        w = strength(policy, batch, p0, song_scale)
        m = posterior_rate(policy, p0, batch, n, w)
        q, terms = parts(policy, batch, m)
        fresh = freshness(policy, batch.created_ts, now)
        return BatchEvaluation(
            quality=q,
            score=(SCORE_FLOOR + q) * fresh,
            freshness=fresh,
            prior_rate=p0,
            posterior_rate=m,
            popularity=popularity(policy, m),
            examined_plays=n if policy.position_aware else None,
            contributions=terms,
            prior_strength=w,
        )


def beta_params(policy: Policy, batch: SongBatch, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Each song's Beta posterior of its like rate, (a, b): what Thompson exploration draws from."""
    with np.errstate(all="ignore"):
        song_scale = row_scale(policy, batch, scale)
        p0 = prior_rate(policy, batch, song_scale)
        w = strength(policy, batch, p0, song_scale)
        misses = evidence(policy, batch) - batch.likes
        a = w * p0 + batch.likes
        b = w * (1.0 - p0) + np.where(misses < 0.0, 0.0, misses)  # max(evidence - likes, 0.0)
    return a, b


def sample_rates(policy: Policy, batch: SongBatch, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``Policy.sample_rates``: one like rate per song from its Beta posterior (the same draws from ``rng``)."""
    if not len(batch):
        return np.empty(0)
    a, b = beta_params(policy, batch, scale)
    return rng.beta(a, b)


def sampled_scores(policy: Policy, batch: SongBatch, rates: np.ndarray, now: float) -> np.ndarray:
    """``Policy.sampled_score`` per song: the score with a sampled like rate in place of the posterior mean."""
    with np.errstate(all="ignore"):
        quality, _ = parts(policy, batch, rates)
        return (SCORE_FLOOR + quality) * freshness(policy, batch.created_ts, now)


# -- membership -----------------------------------------------------------------------------------
def admits(policy: Policy, batch: SongBatch) -> np.ndarray:
    """``Policy.admits`` per song (tags and duration need a batch read with WRITE_FIELDS)."""
    ok = np.ones(len(batch), np.bool_)
    gen_in, gen_out = policy._gen_in, policy._gen_out
    if gen_in or gen_out:
        names, codes = batch.generator_codes
        allowed = np.fromiter(((not gen_in or g in gen_in) and g not in gen_out for g in names), np.bool_, len(names))
        ok &= allowed[codes]
    tags_any, tags_out = policy._tags_any, policy._tags_out
    if tags_any:
        ok &= np.fromiter((tags_match(t, tags_any) for t in batch.tags), np.bool_, len(batch))
    if tags_out:
        ok &= np.fromiter((tags_out.isdisjoint(t) for t in batch.tags), np.bool_, len(batch))
    min_duration = policy.config.filters.min_duration_s
    if min_duration is not None:
        duration = batch.duration_s if batch.duration_s is not None else np.full(len(batch), np.nan)
        ok &= duration >= min_duration  # an absent duration (NaN) is refused
    return ok


def in_age_window(policy: Policy, created_ts: np.ndarray, now: float, max_age_s: float | None = None) -> np.ndarray:
    """``Policy.in_age_window`` per song; ``max_age_s`` narrows the policy's window (a request's filter)."""
    age = now - created_ts
    ok = age >= policy.min_age_s
    bound = policy.max_age_s
    if max_age_s is not None:
        bound = max_age_s if bound is None else min(bound, max_age_s)
    if bound is not None:
        ok &= age < bound
    return np.asarray(ok, dtype=np.bool_)
