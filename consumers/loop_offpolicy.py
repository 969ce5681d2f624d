"""The loop simulation's check of off-policy evaluation (issue 16, item 7): estimate against truth.

A policy's run leaves a served log with its exploration slots, pools and propensities. Off-policy
evaluation (:mod:`ranker.model.offpolicy`) estimates from it the like rate of the songs a candidate
would have put in those slots. The simulation knows what that like rate truly is: for each logged
slot, the candidate's pick from the slot's pool, the true like probability of that listener for that
song at that position, weighed by how often a listener plays that position (the slot's position does
not depend on the song). The candidate here is the feed's prior order (the initial head's
``rank_score``, as ``apexrank evaluate-policy`` scores it): what a prior-only feed would explore.
All of it is SYNTHETIC.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow.compute as pc

from consumers.evaluate_policy import load_impressions, pool_songs, prior_scores
from consumers.loop_world import LoopConfig, _World
from ranker import stores
from ranker.model.offpolicy import ExploredSlots, evaluate_slots
from ranker.serving.policy import compile_policies
from ranker.settings import Settings


def play_inclusion(page: int, plays: int, seed: int, draws: int = 20_000) -> np.ndarray:
    """How often a listener plays each position of a page of ``page`` (the simulation's ``_pick``:
    ``plays`` positions without replacement, weight 1 / (1 + position)), by Monte Carlo."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 400]))
    weights = 1.0 / (1.0 + np.arange(page))
    keys = rng.random((draws, page)) ** (1.0 / weights)  # Efraimidis-Spirakis: top keys = weighted sample
    top = np.argsort(-keys, axis=1)[:, : min(plays, page)]
    return np.bincount(top.ravel(), minlength=page) / draws


def off_policy_check(
    settings: Settings, world: _World, cfg: LoopConfig, users_of: Mapping[str, int], seed: int
) -> dict[str, Any]:
    """The off-policy estimate of the prior order's like rate on this run's exploration slots, its
    interval, and the true value; ``users_of``: request_id -> the listener who was served it."""
    now = datetime.now(UTC)
    table = load_impressions(settings, now - timedelta(days=1), now)
    if not table.num_rows or not pc.any(table.column("explored")).as_py():
        return {"explored": 0}
    feed = settings.feed.name
    policy = compile_policies(settings.feed.feeds, settings.feed.like_rate)[feed]
    store = stores.score_store(settings)
    try:
        scores = prior_scores(store, policy, pool_songs(table), time.time())
    finally:
        store.close()
    slots = ExploredSlots.from_impressions(table)
    estimate = evaluate_slots(slots, scores, seed=seed)
    # The truth: each page's top-n of its pool by the same scores, at the explored positions of that page.
    index_of = {s.song_id: i for i, s in enumerate(world.songs)}
    play = play_inclusion(cfg.page_size, cfg.plays_per_user, seed)
    explored = table.filter(pc.fill_null(table.column("explored"), False))
    pages: dict[str, tuple[list[int], list[str]]] = {}
    for rid, pos, pool in zip(
        explored.column("request_id").to_pylist(),
        explored.column("position").to_pylist(),
        explored.column("pool").to_pylist(),
        strict=True,
    ):
        positions, _ = pages.setdefault(rid, ([], list(pool or [])))
        positions.append(int(pos))
    likes = plays = 0.0
    for rid, (positions, pool) in pages.items():
        user = users_of.get(rid)
        ranked = sorted((s for s in pool if s in scores), key=lambda s: -scores[s])
        if user is None:
            continue
        for pos, song in zip(sorted(positions), ranked, strict=False):
            q = float(play[pos]) if pos < len(play) else 0.0
            plays += q
            likes += q * world.like_probability(user, index_of[song], cfg, pos)
    truth = likes / plays if plays else float("nan")
    out = estimate.to_dict()
    out.update(
        truth=truth,
        covered=bool(estimate.low <= truth <= estimate.high),
        pages_with_user=sum(rid in users_of for rid in pages),
    )
    return out
