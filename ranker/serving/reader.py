"""The API's read path: feed pages, reranking of candidates, one song's record.

:class:`FeedReader` serves a page with one range read and one pipelined hydration,
then assembles it: exploit slots in stored order, near-duplicates and songs over the
per-generator cap pushed down, exploration slots filled by Thompson sampling from the
songs just below. The cursor is keyset based (:mod:`ranker.serving.cursor`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from indexes.base import AsyncScoreReads
from indexes.redis_schema import (
    CREATED_AT,
    ENGAGEMENT_COUNTERS,
    GENERATOR,
    MODEL_VERSION,
    SCORED_AT,
    counter_field,
)
from ranker.events import TASKS
from ranker.serving.batch import SongBatch, admits, evaluate, in_age_window
from ranker.serving.cursor import MAX_SKIP, Cursor, _after, _skip_key
from ranker.serving.page_cache import PageCache, _Row, _Window
from ranker.serving.policy import (
    Policy,
    beta_params,
    calibration_scale,
    compile_policies,
    explore_positions,
    explore_slots,
)
from ranker.serving.state import READ_FIELDS, WRITE_FIELDS, _float, state_from_fields
from ranker.settings import FeedPolicy, Settings

_MAX_FETCHES = 4


class UnknownFeedError(KeyError):
    """No feed of that name is configured."""


# -- reads --------------------------------------------------------------------------------------
class VectorSource(Protocol):
    def vectors(self, song_ids: Sequence[str]) -> dict[str, np.ndarray]: ...


@dataclass
class FeedPage:
    feed: str
    items: list[dict[str, Any]]
    next_cursor: str | None


class FeedReader:
    """The API's read path: feed pages, reranking of candidates, a song's record."""

    def __init__(
        self,
        settings: Settings,
        reads: AsyncScoreReads,
        vectors: VectorSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is the wall clock scores are computed at; ``monotonic`` times the caches."""
        self.settings = settings
        self.reads = reads
        self.vectors = vectors
        self.policies = compile_policies(settings.feed.feeds, settings.feed.like_rate)
        self._clock = clock
        self._monotonic = monotonic
        self._scale = 1.0
        self._scale_at = -math.inf
        self.page_cache = PageCache(settings.api.page_cache_ttl_s, settings.api.page_cache_max_bytes, monotonic)

    def policy(self, feed: str) -> Policy:
        try:
            return self.policies[feed]
        except KeyError:
            raise UnknownFeedError(feed) from None

    def inline_policy(self, base: str | None, overrides: Mapping[str, Any]) -> Policy:
        """A named feed's policy (default feed if None) with some fields replaced; ValueError if invalid.

        Beyond FeedPolicy's own bounds, a half-life so short that its decay rate is not a
        finite number (below about 1e-316 hours) is refused: freshness would be NaN.
        """
        name = base or self.settings.feed.name
        config = self.policy(name).config
        merged = FeedPolicy.model_validate({**config.model_dump(), **overrides})
        policy = Policy(name, merged, self.settings.feed.like_rate)
        if not math.isfinite(policy.decay):
            raise ValueError(f"half_life_hours: {merged.half_life_hours!r} is too short to decay by")
        return policy

    async def scale(self) -> float:
        """The calibration scale, cached for ``api.calibration_ttl_s``."""
        now = self._monotonic()
        if now - self._scale_at >= self.settings.api.calibration_ttl_s:
            totals = await self.reads.calibration_totals()
            self._scale = calibration_scale(*totals, self.settings.feed.like_rate)
            self._scale_at = now
        return self._scale

    # -- pages ---------------------------------------------------------------------------------
    async def page(
        self,
        feed: str,
        limit: int,
        cursor: str | None = None,
        *,
        rng: np.random.Generator | None = None,
    ) -> FeedPage:
        policy = self.policy(feed)
        cur = Cursor.decode(cursor, feed) if cursor else None
        now = self._clock()
        scale = await self.scale()
        n_explore = explore_slots(limit, policy.config.explore_share)
        window = await self._window(policy, limit + (policy.config.explore_pool if n_explore else 0), cur, cursor, now)
        chosen, explored = self._assemble(policy, window, limit - n_explore, n_explore, scale, now, rng)
        items = self._items(policy, chosen, explored, scale, now)
        skip = set(cur.skip) if cur else set()
        b_score, b_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        next_cursor = self._next_cursor(feed, window.rows, items, skip, b_score, b_id, window.exhausted)
        return FeedPage(feed, items, next_cursor)

    async def _window(self, policy: Policy, want: int, cur: Cursor | None, token: str | None, now: float) -> _Window:
        """The rows after the cursor, hydrated, until ``want`` are eligible (ZRANGE + HMGET, rarely more).

        Reused for ``api.page_cache_ttl_s`` by requests for the same page: a hot first page
        then costs no Redis round trip (it is at most that many seconds stale). The cache
        holds at most ``api.page_cache_max_bytes`` (:class:`PageCache`).
        """
        cache = self.page_cache
        key = (policy.name, token or "", want)
        if cache.enabled:
            hit = cache.get(key)
            if hit is not None:
                return hit
        skip = cur.skip if cur else frozenset()
        start_score, start_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        found = _Window(self._monotonic())
        for _ in range(_MAX_FETCHES):
            count = want - len(found.eligible) + 8
            rows = await self.reads.feed_window(policy.name, None if math.isinf(start_score) else start_score, count)
            found.exhausted = len(rows) < count
            fresh = [_Row(s, sc) for s, sc in rows if _after(sc, s, start_score, start_id)]
            todo = [r for r in fresh if _skip_key(r.song_id) not in skip]
            values = await self.reads.read_fields([r.song_id for r in todo], READ_FIELDS)
            for row, v in zip(todo, values, strict=True):
                state = state_from_fields(row.song_id, v, now)
                if state is not None and policy.in_age_window(state.created_ts, now):
                    row.state = state
                    found.eligible.append(row)
            found.rows.extend(fresh)
            if found.exhausted or len(found.eligible) >= want or not rows:
                break
            start_score, start_id = rows[-1][1], rows[-1][0]
        if policy.config.dedup_threshold is not None and self.vectors is not None and found.eligible:
            vectors = self.vectors.vectors([r.song_id for r in found.eligible])
            if vectors:
                found.slot = {sid: n for n, sid in enumerate(vectors)}
                matrix = np.stack(list(vectors.values()))
                found.gram = matrix @ matrix.T  # cosines between every pair of candidates, once
        cache.put(key, found)
        return found

    def _assemble(
        self,
        policy: Policy,
        window: _Window,
        n_exploit: int,
        n_explore: int,
        scale: float,
        now: float,
        rng: np.random.Generator | None,
    ) -> tuple[list[_Row], list[tuple[_Row, float]]]:
        """Exploit slots (diversity rules push offenders down), then Thompson-sampled exploration."""
        cfg = policy.config
        cap = cfg.max_per_generator
        threshold = cfg.dedup_threshold
        eligible, slot, gram = window.eligible, window.slot, window.gram
        per_gen: Counter[str] = Counter()
        placed: list[int] = []

        def fits(row: _Row) -> bool:
            assert row.state is not None
            if cap is not None and per_gen[row.state.generator] >= cap:
                return False
            n = slot.get(row.song_id)
            if n is not None and placed and threshold is not None:
                return float(gram[n, placed].max()) <= threshold
            return True

        def place(row: _Row) -> None:
            assert row.state is not None
            per_gen[row.state.generator] += 1
            n = slot.get(row.song_id)
            if n is not None:
                placed.append(n)

        chosen: list[_Row] = []
        deferred: list[_Row] = []
        i = 0
        while len(chosen) < n_exploit and i < len(eligible):
            row = eligible[i]
            i += 1
            if fits(row):
                place(row)
                chosen.append(row)
            else:
                deferred.append(row)
        explored: list[tuple[_Row, float]] = []
        pool = eligible[i : i + cfg.explore_pool] if n_explore else []
        if pool:
            states = [r.state for r in pool if r.state is not None]
            rates = policy.sample_rates(states, scale, rng or np.random.default_rng())
            sampled = [policy.sampled_score(s, float(rate), now) for s, rate in zip(states, rates, strict=True)]
            for j in sorted(range(len(pool)), key=lambda j: -sampled[j]):
                if len(explored) == n_explore:
                    break
                if fits(pool[j]):
                    place(pool[j])
                    explored.append((pool[j], float(rates[j])))
        taken = {id(r) for r, _ in explored}
        short = n_exploit + n_explore - len(chosen) - len(explored)
        if short > 0:  # too few beyond the exploit slots to explore, or the feed ends
            for row in eligible[i:]:
                if short == 0:
                    break
                if id(row) not in taken and fits(row):
                    place(row)
                    chosen.append(row)
                    taken.add(id(row))
                    short -= 1
            # Diversity rules give way only when nothing else is left: pushed down, not dropped.
            chosen.extend(deferred[:short])
        return chosen, explored

    def _items(
        self,
        policy: Policy,
        chosen: list[_Row],
        explored: list[tuple[_Row, float]],
        scale: float,
        now: float,
    ) -> list[dict[str, Any]]:
        items = [self._item(policy, r, scale, now) for r in chosen]
        positions = explore_positions(len(chosen) + len(explored), len(explored))
        for pos, (row, rate) in zip(positions, explored, strict=True):
            item = self._item(policy, row, scale, now)
            item["explore"] = True
            item["components"]["sampled_rate"] = rate
            items.insert(pos, item)
        return items

    @staticmethod
    def _item(policy: Policy, row: _Row, scale: float, now: float) -> dict[str, Any]:
        assert row.state is not None
        ev = policy.evaluate(row.state, scale, now)
        return {
            "song_id": row.song_id,
            "score": ev.score,
            "explore": False,
            "components": policy.explain(row.state, ev, now),
        }

    @staticmethod
    def _next_cursor(
        feed: str,
        rows: list[_Row],
        items: list[dict[str, Any]],
        skip: set[int],
        b_score: float,
        b_id: str,
        exhausted: bool,
    ) -> str | None:
        """Advance the boundary over the longest run of rows that are served or dropped; songs
        served beyond it go into the skip set, skip entries passed by it leave."""
        served = {item["song_id"] for item in items}
        passed = 0
        for row in rows:
            if row.state is not None and row.song_id not in served:
                break
            passed += 1
        if passed:
            b_score, b_id = rows[passed - 1].stored, rows[passed - 1].song_id
        left = {_skip_key(r.song_id) for r in rows[:passed]}
        ahead = {_skip_key(r.song_id) for r in rows[passed:] if r.song_id in served}
        remaining = rows[passed:]
        if exhausted and not any(r.state is not None and r.song_id not in served for r in remaining):
            return None
        new_skip = ahead | (skip - left)
        if len(new_skip) > MAX_SKIP:
            new_skip = ahead | set(sorted(skip - left)[: MAX_SKIP - len(ahead)])
        return Cursor(feed, b_score, b_id, frozenset(new_skip)).encode()

    # -- rerank --------------------------------------------------------------------------------
    async def rank(
        self, candidates: Sequence[str], policy: Policy, *, apply_filters: bool = False, explain: bool = True
    ) -> dict[str, Any]:
        """Order known candidates by the policy's score; unknown (unscored) and filtered ids listed apart."""
        return (await self.rank_response(candidates, policy, apply_filters=apply_filters, explain=explain)).body

    async def rank_response(
        self, candidates: Sequence[str], policy: Policy, *, apply_filters: bool = False, explain: bool = True
    ) -> RankResponse:
        """:meth:`rank`'s body, and where its first non-finite number is, found on the arrays.

        One read, one columnar batch (:mod:`ranker.serving.batch`), the policy evaluated over
        it in numpy; item dicts are built only for the songs returned, explanations only with
        ``explain``. Order: score descending, then song id.
        """
        now = self._clock()
        scale = await self.scale()
        fields = WRITE_FIELDS if apply_filters else READ_FIELDS
        values = await self.reads.read_fields(candidates, fields)
        batch = SongBatch.from_fields(candidates, values, now)
        keep = batch.scored
        filtered: list[str] = []
        if apply_filters:
            admitted = admits(policy, batch) & in_age_window(policy, batch.created_ts, now)
            filtered = [batch.song_ids[i] for i in np.flatnonzero(keep & ~admitted).tolist()]
            keep = keep & admitted
        unknown = [batch.song_ids[i] for i in np.flatnonzero(~batch.scored).tolist()]
        rows = np.flatnonzero(keep)
        ev = evaluate(policy, batch, scale, now)
        order = rows[_rank_order(ev.score[rows], [batch.song_ids[i] for i in rows.tolist()])]
        ids = [batch.song_ids[i] for i in order.tolist()]
        scores = ev.score[order]
        columns: list[tuple[str, np.ndarray, np.ndarray | None]] = [("score", scores, None)]
        if explain:
            contributions = [(name, v[order], None if p is None else p[order]) for name, v, p in ev.contributions]
            parts = {
                "quality": ev.quality[order],
                "freshness": ev.freshness[order],
                "age_hours": (now - batch.created_ts[order]) / 3600.0,
                "prior_rate": ev.prior_rate[order],
                "posterior_rate": ev.posterior_rate[order],
                "plays": batch.plays[order],
                "likes": batch.likes[order],
            }
            columns += [(f"components.{k}", parts[k], None) for k in ("quality", "freshness", "age_hours")]
            columns += [(f"components.contributions.{name}", v, p) for name, v, p in contributions]
            columns += [(f"components.{k}", parts[k], None) for k in ("prior_rate", "posterior_rate", "plays", "likes")]
            items = [
                {"song_id": sid, "score": sc, "components": comp}
                for sid, sc, comp in zip(ids, scores.tolist(), _components(parts, contributions), strict=True)
            ]
        else:
            items = [{"song_id": sid, "score": sc} for sid, sc in zip(ids, scores.tolist(), strict=True)]
        body = {"feed": policy.name, "items": items, "unknown": unknown, "filtered": filtered}
        return RankResponse(body, _first_non_finite(columns))

    # -- one song ------------------------------------------------------------------------------
    async def song(self, song_id: str) -> dict[str, Any] | None:
        """A song's scores, engagement, prior and posterior per feed; None if it is not scored."""
        raw = await self.reads.get_song(song_id)
        if not raw:
            return None
        now = self._clock()
        extended = [raw.get(f) for f in WRITE_FIELDS]
        state = state_from_fields(song_id, extended, now)
        if state is None:
            return None
        scale = await self.scale()
        feeds: dict[str, Any] = {}
        for name, policy in self.policies.items():
            ev = policy.evaluate(state, scale, now)
            feeds[name] = {
                "admitted": policy.admits(state) and policy.in_age_window(state.created_ts, now),
                "score": ev.score,
                "quality": ev.quality,
                "freshness": ev.freshness,
                "posterior_rate": ev.posterior_rate,
                "beta": list(beta_params(ev.prior_rate, state.likes, state.plays, policy.w)),
                "prior_strength": policy.w,
            }
        default = self.policies[self.settings.feed.name]
        return {
            "song_id": song_id,
            "model_version": raw.get(MODEL_VERSION),
            "generator": raw.get(GENERATOR),
            "created_at": raw.get(CREATED_AT),
            "scored_at": raw.get(SCORED_AT),
            "scores": {t: state.scores[t] for t in TASKS if t in state.scores},
            "engagement": {c: int(_float(raw.get(counter_field(c)))) for c in ENGAGEMENT_COUNTERS},
            "like_rate": {
                "model": state.model_rate,
                "prior": default.prior_rate(state, scale),
                "calibration_scale": scale,
                "source": "target_transform" if state.model_rate is not None else "fallback",
            },
            "feeds": feeds,
        }


# -- rerank helpers -------------------------------------------------------------------------------
@dataclass
class RankResponse:
    """What ``POST /v1/rank`` answers, and the path in ``body["items"]`` of its first NaN or
    infinity (``"3.components.posterior_rate"``, in serialisation order), None if all are finite."""

    body: dict[str, Any]
    non_finite: str | None


def _rank_order(scores: np.ndarray, song_ids: list[str]) -> np.ndarray:
    """Indices sorting by ``(-score, song_id)`` exactly as ``list.sort`` with that key does.

    Without NaN the key order is total and a stable lexicographic sort gives the same order
    (ties keep their input order in both); with a NaN, whose comparisons are all false, the
    result depends on the sort's algorithm, so it is Python's own sort on the same keys.
    """
    if len(song_ids) < 2:
        return np.arange(len(song_ids))
    negated = -scores
    if not np.isnan(negated).any():
        return np.lexsort((np.asarray(song_ids), negated))
    keys = negated.tolist()
    return np.asarray(sorted(range(len(keys)), key=lambda i: (keys[i], song_ids[i])), dtype=np.intp)


def _components(
    parts: dict[str, np.ndarray], contributions: list[tuple[str, np.ndarray, np.ndarray | None]]
) -> list[dict[str, Any]]:
    """``Policy.explain`` of each song, from the arrays (same keys, same order, same floats)."""
    n = len(parts["quality"])
    names = [name for name, _, _ in contributions]
    values = np.column_stack([v for _, v, _ in contributions]).tolist() if n else []
    if all(p is None for _, _, p in contributions):
        terms = [dict(zip(names, row, strict=True)) for row in values]
    else:
        masks = np.column_stack([np.ones(n, np.bool_) if p is None else p for _, _, p in contributions]).tolist()
        terms = [
            {name: v for name, v, m in zip(names, row, mask, strict=True) if m}
            for row, mask in zip(values, masks, strict=True)
        ]
    return [
        {
            "quality": q,
            "freshness": f,
            "age_hours": a,
            "contributions": c,
            "prior_rate": p0,
            "posterior_rate": m,
            "plays": pl,
            "likes": lk,
        }
        for q, f, a, c, p0, m, pl, lk in zip(
            parts["quality"].tolist(),
            parts["freshness"].tolist(),
            parts["age_hours"].tolist(),
            terms,
            parts["prior_rate"].tolist(),
            parts["posterior_rate"].tolist(),
            parts["plays"].tolist(),
            parts["likes"].tolist(),
            strict=True,
        )
    ]


def _first_non_finite(columns: list[tuple[str, np.ndarray, np.ndarray | None]]) -> str | None:
    """The path of the first NaN or infinity, item by item, each item's values in serialisation order."""
    bad = np.column_stack(
        [~np.isfinite(v) if present is None else ~np.isfinite(v) & present for _, v, present in columns]
    )
    rows = np.flatnonzero(bad.any(axis=1))
    if not len(rows):
        return None
    i = int(rows[0])
    return f"{i}.{columns[int(np.argmax(bad[i]))][0]}"
