"""Issue 17, item 2: a song's prior strength w falls with its model's spread and its OOD flag.

The mapping is Policy.strength (docs/ranking.md, "Uncertain priors"); the vectorised path's equality
with it is covered by the equivalence tests (tests/test_rank_equivalence.py draws spreads and flags).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from indexes import RedisScoreStore
from indexes.redis_schema import OOD_FLAG, PRIOR_SD_FIELD
from ranker.serving.policy import Policy, SongState
from ranker.serving.reader import FeedPage, FeedReader
from ranker.serving.writer import FeedWriter
from ranker.settings import FeedPolicy, LikeRatePrior, Settings
from tests.test_policy import NOW, plain, record, with_feeds


def song(**kw: object) -> SongState:
    base = SongState("s", {"likes": 50.0}, 0.1, 0.0, 0.0, NOW, "g")
    return replace(base, **kw)  # type: ignore[arg-type]


def policy(**kw: object) -> Policy:
    return Policy("p", FeedPolicy(prior_strength=20.0, prior_strength_min=2.0, **kw), LikeRatePrior())  # type: ignore[arg-type]


def test_the_prior_strength_falls_with_the_spread_and_the_ood_flag() -> None:
    p = policy()
    assert p.strength(song(), 0.1) == 20.0  # a single head: no spread, the policy's w
    assert p.strength(song(prior_sd=0.01), 0.1) == 20.0  # confident: 0.09 / 1e-4 - 1 = 899, capped at w
    assert p.strength(song(prior_sd=0.1), 0.1) == pytest.approx(8.0)  # 0.09 / 0.01 - 1
    assert p.strength(song(prior_sd=0.3), 0.1) == 2.0  # 0.09 / 0.09 - 1 = 0, floored
    assert p.strength(song(prior_sd=0.05), 0.1, scale=2.0) == pytest.approx(8.0)  # the spread is calibrated as p0 is
    assert p.strength(song(prior_sd=0.0), 0.1) == 20.0
    assert p.strength(song(ood=True), 0.1) == 5.0  # times ood_prior_factor 0.25
    assert p.strength(song(prior_sd=0.1, ood=True), 0.1) == 2.0  # 8 * 0.25, floored
    assert policy(uncertain_prior=False).strength(song(prior_sd=0.3), 0.1) == 20.0
    assert policy(ood_prior_factor=1.0).strength(song(ood=True), 0.1) == 20.0
    low = Policy("p", FeedPolicy(prior_strength=1.0, prior_strength_min=2.0), LikeRatePrior())
    assert low.strength(song(prior_sd=0.3, ood=True), 0.1) == 1.0  # never above the policy's own w


def test_an_uncertain_song_yields_to_its_evidence_sooner() -> None:
    p = policy()
    heard = {"plays": 20.0, "likes": 10.0, "model_rate": 0.1}  # evidence says 0.5; the model said 0.1
    sure = p.evaluate(song(**heard), 1.0, NOW)
    unsure = p.evaluate(song(**heard, prior_sd=0.1), 1.0, NOW)
    assert sure.posterior_rate == pytest.approx((20 * 0.1 + 10) / (20 + 20))
    assert unsure.posterior_rate == pytest.approx((8 * 0.1 + 10) / (8 + 20))
    assert abs(unsure.posterior_rate - 0.5) < abs(sure.posterior_rate - 0.5)
    assert unsure.prior_strength == pytest.approx(8.0) and sure.prior_strength == 20.0


def test_thompson_explores_an_uncertain_song_more_than_its_confident_twin(
    settings: Settings, store: RedisScoreStore
) -> None:
    """Two songs with the same low prior at the bottom of an exploration pool of stronger songs, one with a
    wide spread: its Beta is wider, so its draws clear the pool's bar more often. Its explanation says why.

    (Where the bar is near a song's own prior, a wider Beta at the same mean is explored no more: at a
    low rate its mass piles up near 0. docs/ranking.md, "Uncertain priors", has the figures.)"""
    s = with_feeds(settings, {"x": plain(explore_share=0.1, explore_pool=20, half_life_hours=None)}, calibrate=False)
    likes = [100.0] * 45 + [70.0] * 18 + [10.0, 10.0] + [5.0] * 15  # exploit slots, the pool, the rest
    songs = [record(f"s{i:03d}", likes=v) for i, v in enumerate(likes)]
    uncertain, confident, strange = songs[63], songs[64], songs[50]
    uncertain.extra[PRIOR_SD_FIELD] = 0.1  # w = p0 (1 - p0) / 0.01 - 1 = 1.4: the floor, 2
    strange.extra[OOD_FLAG] = 1
    FeedWriter(s, store).on_scored(songs, now=NOW)

    async def pages(n: int) -> list[FeedPage]:
        reads = store.async_reads()
        try:
            reader = FeedReader(s, reads, clock=lambda: NOW)
            await reader.sync.load()
            rng = np.random.default_rng(5)
            return [await reader.page("x", 50, rng=rng) for _ in range(n)]
        finally:
            await reads.close()

    got = asyncio.run(pages(600))
    explored: Counter[str] = Counter()
    for page in got:
        assert uncertain.song_id in page.pool and confident.song_id in page.pool
        for item in page.items:
            if item["explore"]:
                explored[item["song_id"]] += 1
            c = item["components"]
            if item["song_id"] == uncertain.song_id:
                assert c["prior_sd"] == 0.1 and c["ood"] is False and c["prior_strength"] == 2.0
            elif item["song_id"] == strange.song_id:
                assert c["prior_sd"] is None and c["ood"] is True and c["prior_strength"] == 5.0
            else:
                assert "prior_sd" not in c and "prior_strength" not in c
    assert explored[strange.song_id] > 0
    assert explored[uncertain.song_id] > 3 * max(1, explored[confident.song_id]), explored
