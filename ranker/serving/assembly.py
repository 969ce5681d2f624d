"""A feed page assembled from its window: exploit and exploration slots, the items, the next cursor.

Pure functions over a :class:`~ranker.serving.page_cache._Window` (what the reader's scan of the
feed found): :func:`assemble` places the slots (diversity rules push offenders down, Thompson
sampling fills the exploration slots from the songs just below, so from the window's eligible
songs only: what request filters reject is never explored), :func:`page_items` evaluates and
explains the songs served in one pass, :func:`next_cursor` advances the keyset cursor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ranker.serving.batch import beta_params, evaluate, popularity, sampled_scores
from ranker.serving.columns import explanation_columns, explanations, mark_untrained
from ranker.serving.cursor import MAX_SKIP, Cursor, skip_key
from ranker.serving.page_cache import _Window
from ranker.serving.personal import Personal
from ranker.serving.policy import Policy

#: Further Thompson draws of the whole pool that estimate an explored song's propensity (with the realised one).
PROPENSITY_DRAWS = 31


@dataclass(frozen=True)
class ExplorePool:
    """The exploration pool as the page's Thompson draw saw it: rows of the window's batch (feed order),
    each song's Beta posterior (a, b), and its sampled score at the two ends of the like-rate scale.

    A sampled score is affine in the sampled rate's popularity, ``low + (high - low) * pop``: the
    realised draw and the propensity's further draws (:func:`explore_layout`) both use these, so
    the pool is evaluated once per page."""

    rows: np.ndarray
    a: np.ndarray
    b: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, policy: Policy, window: _Window, rows: np.ndarray, scale: float, now: float) -> ExplorePool:
        batch = window.batch
        assert batch is not None
        size = len(rows)
        songs = batch.take(np.concatenate([rows, rows]))  # the pool twice: one evaluation at each end of the scale
        a, b = beta_params(policy, songs, scale)
        lr = policy.like_rate
        both = sampled_scores(policy, songs, np.repeat([lr.rate_min, lr.rate_max], size), now)
        return cls(rows, a[:size], b[:size], both[:size], both[size:])

    def scores(self, policy: Policy, rates: np.ndarray) -> np.ndarray:
        """The sampled scores of these sampled rates (one row per draw, or one draw)."""
        return self.low + (self.high - self.low) * popularity(policy, rates)


def assemble(
    policy: Policy,
    window: _Window,
    n_exploit: int,
    n_explore: int,
    scale: float,
    now: float,
    rng: np.random.Generator | None,
) -> tuple[list[int], list[tuple[int, float]], ExplorePool | None]:
    """Exploit slots (diversity rules push offenders down), then Thompson-sampled exploration.

    Returns rows of the window's batch: the exploit ones in page order, the explored
    ones with their sampled like rates, and the exploration pool (None: no exploration).
    """
    cfg = policy.config
    cap = cfg.max_per_generator
    threshold = cfg.dedup_threshold
    batch = window.batch
    assert batch is not None
    ids, generators = batch.song_ids, batch.generators
    slot, gram = window.slot, window.gram
    per_gen: Counter[str] = Counter()
    # closest[n]: the largest cosine between candidate n and a song placed so far (the max
    # over the placed columns of its gram row, kept as songs are placed)
    closest = np.full(len(gram), -np.inf, dtype=gram.dtype)
    placed = False

    def fits(j: int) -> bool:
        if cap is not None and per_gen[generators[j]] >= cap:
            return False
        n = slot.get(ids[j])
        if n is not None and placed and threshold is not None:
            return float(closest[n]) <= threshold
        return True

    def place(j: int) -> None:
        nonlocal closest, placed
        per_gen[generators[j]] += 1
        n = slot.get(ids[j])
        if n is not None:
            closest = np.maximum(closest, gram[:, n])
            placed = True

    size = len(batch)
    chosen: list[int] = []
    deferred: list[int] = []
    i = 0
    while len(chosen) < n_exploit and i < size:
        j = i
        i += 1
        if fits(j):
            place(j)
            chosen.append(j)
        else:
            deferred.append(j)
    explored: list[tuple[int, float]] = []
    rows = np.arange(i, min(i + cfg.explore_pool, size)) if n_explore else np.arange(0)
    pool = ExplorePool.of(policy, window, rows, scale, now) if len(rows) else None
    if pool is not None:
        rates = (rng or np.random.default_rng()).beta(pool.a, pool.b)  # sample_rates' draw, from one evaluation
        sampled = pool.scores(policy, rates).tolist()
        for k in sorted(range(len(rows)), key=lambda k: -sampled[k]):
            if len(explored) == n_explore:
                break
            j = int(rows[k])
            if fits(j):
                place(j)
                explored.append((j, float(rates[k])))
    taken = {j for j, _ in explored}
    short = n_exploit + n_explore - len(chosen) - len(explored)
    if short > 0:  # too few beyond the exploit slots to explore, or the feed ends
        for j in range(i, size):
            if short == 0:
                break
            if j not in taken and fits(j):
                place(j)
                chosen.append(j)
                taken.add(j)
                short -= 1
        # Diversity rules give way only when nothing else is left: pushed down, not dropped.
        chosen.extend(deferred[:short])
    return chosen, explored, pool


def explore_layout(
    policy: Policy,
    page_len: int,
    explored: list[tuple[int, float]],
    pool: ExplorePool | None,
    rng: np.random.Generator | None,
) -> tuple[list[int], list[float]]:
    """Where the explored songs go on a page of ``page_len``, and each one's propensity.

    Positions: ``len(explored)`` distinct ones, uniformly at random from the request's ``rng`` (the
    one that drew the Thompson samples, so seeded runs stay reproducible), sorted; the explored songs
    fill them in their sampled order. A song's position is thus independent of the song.

    Propensity: P(the song is among the page's explored songs | pool), estimated as the share of
    :data:`PROPENSITY_DRAWS` further Thompson draws of the whole pool, plus the realised one, in
    which it is among the top ``len(explored)`` by sampled score. The diversity rules'
    rejections are ignored in the further draws (they would need the page's placement loop per
    draw); the realised draw counts the songs actually explored, so a propensity is never 0 and
    a pool's propensities add up to ``len(explored)``.
    """
    n = len(explored)
    if not n or pool is None:
        return [], []
    gen = rng or np.random.default_rng()
    positions = np.sort(gen.choice(page_len, size=n, replace=False)).tolist()
    draws = PROPENSITY_DRAWS
    size = len(pool.rows)
    rates = gen.beta(pool.a, pool.b, size=(draws, size))  # the draws a tiled sample_rates would make, in order
    scores = pool.scores(policy, rates)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :n]  # ties: the feed's order, as the realised draw's
    hits = np.bincount(top.ravel(), minlength=size)
    at = {int(row): k for k, row in enumerate(pool.rows.tolist())}
    return positions, [(int(hits[at[j]]) + 1) / (draws + 1) for j, _ in explored]


def page_items(
    policy: Policy,
    window: _Window,
    chosen: list[int],
    explored: list[tuple[int, float]],
    scale: float,
    now: float,
    person: Personal | None = None,
    positions: list[int] | None = None,
) -> list[dict[str, Any]]:
    """The page's items, evaluated and explained in one pass over their rows; on a personal page a
    row of the taste block has its score times e^(taste term) and the term in its components.
    ``positions``: the explored songs' places on the page (:func:`explore_layout`; none: at its end)."""
    batch = window.batch
    assert batch is not None
    rows = np.asarray(chosen + [j for j, _ in explored], np.intp)
    served = batch.take(rows)
    ev = evaluate(policy, served, scale, now)
    every = np.arange(len(served))
    components = explanations(*explanation_columns(ev, served, every, now))
    ids, score = served.song_ids, ev.score
    if person is not None and window.cosine is not None:
        cosine = window.cosine[rows]
        blended = ~np.isnan(cosine)
        score = np.where(blended, score * np.exp(person.scale * np.where(blended, cosine, 0.0)), score)
        for k in np.flatnonzero(blended).tolist():
            components[k]["taste"] = person.explain(float(cosine[k]))
    scores = score.tolist()
    n = len(chosen)
    made = [
        {"song_id": ids[k], "score": scores[k], "explore": k >= n, "components": components[k]}
        for k in range(len(served))
    ]
    mark_untrained(made, served.untrained)
    items = made[:n]
    if positions is None:
        positions = list(range(n, n + len(explored)))
    for k, (pos, (_, rate)) in enumerate(zip(positions, explored, strict=True), start=n):
        components[k]["sampled_rate"] = rate
        items.insert(pos, made[k])
    return items


def next_cursor(
    feed: str,
    window: _Window,
    items: list[dict[str, Any]],
    skip: set[int],
    b_score: float,
    b_id: str,
    filters: int = 0,
    user: int = 0,
) -> str | None:
    """Advance the boundary over the longest run of rows that are served or dropped; songs
    served beyond it go into the skip set, skip entries passed by it leave. ``window.eligible``
    may be in any order (a personal page's is the blended one): the boundary is the feed's."""
    served = {item["song_id"] for item in items}
    ids, keys = window.ids, window.keys
    # Rows that are not eligible are always passed over, and every song served is an eligible row:
    # the walk visits the eligible places only (under filters, a small share of the rows read).
    # Row j of the window's batch is its eligible place j: one served flag per row, numpy on the places.
    places = np.asarray(window.eligible, np.intp)
    row_ids = window.batch.song_ids if window.batch is not None else [ids[p] for p in window.eligible]
    hit = np.fromiter(map(served.__contains__, row_ids), np.bool_, len(places))
    unserved = places[~hit]
    passed = int(unserved.min()) if len(unserved) else len(ids)
    if passed:
        b_score, b_id = window.stored[passed - 1], ids[passed - 1]
    beyond = places >= passed
    ahead = {skip_key(keys[place]) for place in places[beyond & hit].tolist()}
    if window.exhausted and bool(hit[beyond].all()):
        return None
    kept = skip.difference(skip_key(np.asarray(keys[:passed], np.int64)).tolist()) if skip else set()  # type: ignore[arg-type,attr-defined]
    new_skip = ahead | kept
    if len(new_skip) > MAX_SKIP:
        new_skip = ahead | set(sorted(kept)[: MAX_SKIP - len(ahead)])
    block = window.block
    if block is not None and window.cosine is not None and window.batch is not None:  # the block's songs left
        block = (block[0], block[1], int(np.count_nonzero(~np.isnan(window.cosine) & ~hit)))
    return Cursor(feed, b_score, b_id, frozenset(new_skip), filters, user, block).encode()
