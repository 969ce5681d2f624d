"""The per-song feed page that ``FeedReader.page`` was before the song table: the reference it is held to.

Moved here unchanged but for the plumbing (``self`` is now the ``reader`` argument, the page
cache is not used, and the small row and window records it kept are defined here): one range
read and one hydration of the store per page, a SongState per song, ``Policy.evaluate`` and
``Policy.explain`` per item. The product path does not call it; tests/test_feed_equivalence.py
and benchmarks/api_latency.py do.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ranker.serving.assembly import PROPENSITY_DRAWS
from ranker.serving.cursor import MAX_SKIP, Cursor, _after, _skip_key
from ranker.serving.policy import Policy, SongState, explore_slots
from ranker.serving.reader import FeedPage, FeedReader
from ranker.serving.state import READ_FIELDS, state_from_fields

_MAX_FETCHES = 4


@dataclass
class _Row:
    song_id: str
    stored: float
    state: SongState | None = None  # None: dropped (skipped, not scored, outside the age window)


@dataclass
class _Window:
    rows: list[_Row] = field(default_factory=list)
    eligible: list[_Row] = field(default_factory=list)
    exhausted: bool = False
    slot: dict[str, int] = field(default_factory=dict)
    gram: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))


class ReferencePages:
    """``page`` as it was, over a reader's store reads and vectors."""

    def __init__(self, reader: FeedReader) -> None:
        self.reader = reader
        self.reads = reader.reads
        self.vectors = reader.vectors
        self._clock = reader._clock

    def policy(self, feed: str) -> Policy:
        return self.reader.policy(feed)

    async def scale(self) -> float:
        return await self.reader.scale()

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
        chosen, explored, pool = self._assemble(policy, window, limit - n_explore, n_explore, scale, now, rng)
        items, propensity = self._items(policy, chosen, explored, pool, scale, now, rng)
        skip = set(cur.skip) if cur else set()
        b_score, b_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        next_cursor = self._next_cursor(feed, window.rows, items, skip, b_score, b_id, window.exhausted)
        pool_ids = [r.song_id for r in pool] if explored else []
        return FeedPage(feed, items, next_cursor, propensity, pool_ids)

    async def _window(self, policy: Policy, want: int, cur: Cursor | None, token: str | None, now: float) -> _Window:
        """The rows after the cursor, hydrated, until ``want`` are eligible (ZRANGE + HMGET, rarely more).

        Reused for ``api.page_cache_ttl_s`` by requests for the same page: a hot first page
        then costs no Redis round trip (it is at most that many seconds stale). The cache
        holds at most ``api.page_cache_max_bytes`` (:class:`PageCache`).
        """
        skip = cur.skip if cur else frozenset()
        start_score, start_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        found = _Window()
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
    ) -> tuple[list[_Row], list[tuple[_Row, float]], list[_Row]]:
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
        return chosen, explored, pool

    def _items(
        self,
        policy: Policy,
        chosen: list[_Row],
        explored: list[tuple[_Row, float]],
        pool: list[_Row],
        scale: float,
        now: float,
        rng: np.random.Generator | None,
    ) -> tuple[list[dict[str, Any]], list[float]]:
        """The items with the explored ones at random positions, and each item's propensity: the
        product's draws from ``rng``, in its order, with the per-song policy (top-k by sorting)."""
        items = [self._item(policy, r, scale, now) for r in chosen]
        page_len = len(chosen) + len(explored)
        propensity = [1.0] * page_len
        if not explored:
            return items, propensity
        gen = rng or np.random.default_rng()
        positions = sorted(gen.choice(page_len, size=len(explored), replace=False).tolist())
        states = [r.state for r in pool if r.state is not None]
        rates = policy.sample_rates(states * PROPENSITY_DRAWS, scale, gen).reshape(PROPENSITY_DRAWS, len(pool))
        hits = [0] * len(pool)
        for draw in rates:
            scored = [policy.sampled_score(s, float(r), now) for s, r in zip(states, draw, strict=True)]
            for k in sorted(range(len(pool)), key=lambda k: -scored[k])[: len(explored)]:
                hits[k] += 1
        where = {id(r): k for k, r in enumerate(pool)}
        for pos, (row, rate) in zip(positions, explored, strict=True):
            item = self._item(policy, row, scale, now)
            item["explore"] = True
            item["components"]["sampled_rate"] = rate
            items.insert(pos, item)
            propensity[pos] = (hits[where[id(row)]] + 1) / (PROPENSITY_DRAWS + 1)
        return items, propensity

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
