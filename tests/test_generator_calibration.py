"""Issue 17, item 5: each generator's factor on the calibration scale, shrunk toward 1, fitted by retrain."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import numpy as np
import pytest

from consumers.retrain import refresh_generator_calibration
from indexes import RedisScoreStore
from ranker.model.retrain import Observed
from ranker.serving.policy import generator_factors
from ranker.serving.reader import FeedReader
from ranker.serving.writer import FeedWriter
from ranker.settings import LikeRatePrior, RetrainSettings, Settings
from tests.test_policy import NOW, plain, record, with_feeds


def test_a_generators_factor_is_its_own_rate_ratio_shrunk_toward_one_by_its_evidence() -> None:
    cfg = LikeRatePrior(calibration_strength=0.0, generator_calibration_strength=30.0)
    gens = ["a"] * 4 + ["b"] * 4 + ["c"]
    plays = np.array([1000.0] * 8 + [10.0])
    p0 = np.full(9, 0.1)  # 100 predicted likes per song of a and b, 1 for c's
    likes = np.array([200.0] * 4 + [50.0] * 4 + [2.0])  # a: twice the prior; b: half; c: twice, on little
    got = generator_factors(gens, plays, likes, p0, cfg)
    c = 1002.0 / 801.0  # the global scale
    assert got["a"] == pytest.approx((800 + 30 * c) / (400 + 30) / c)
    assert got["b"] == pytest.approx((200 + 30 * c) / (400 + 30) / c)
    assert got["c"] == pytest.approx((2 + 30 * c) / (1 + 30) / c)
    assert got["a"] > 1.4 and got["b"] < 0.5 and abs(got["c"] - 1) < 0.05  # evidence decides how far
    bounded = generator_factors(gens, plays, likes * 100, p0, LikeRatePrior(calibration_max=2.0))
    assert max(bounded.values()) <= 2.0
    assert generator_factors([], np.zeros(0), np.zeros(0), np.zeros(0), cfg) == {}


def test_a_generators_factor_scales_its_songs_priors_on_pages_and_in_the_song_view(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = with_feeds(settings, {"x": plain(half_life_hours=None)}, calibrate=False)
    FeedWriter(s, store).on_scored([record("a1", generator="a"), record("b1", generator="b")], now=NOW)
    store.set_generator_calibration({"a": 2.0})
    store.client.hset(store.keys.generator_calibration(), mapping={"b": "-1", "c": "junk"})  # read as absent
    assert store.generator_calibration() == {"a": 2.0}

    async def read() -> tuple[dict[str, float], dict[str, float] | None]:
        reads = store.async_reads()
        try:
            reader = FeedReader(s, reads, clock=lambda: NOW)
            await reader.sync.load()
            page = await reader.page("x", 10)
            song = await reader.song("a1")
            assert song is not None
            return {i["song_id"]: i["components"]["prior_rate"] for i in page.items}, song["like_rate"]
        finally:
            await reads.close()

    priors, like_rate = asyncio.run(read())
    assert priors["a1"] == pytest.approx(2 * priors["b1"])  # same scores, a's factor 2
    assert like_rate is not None and like_rate["generator_factor"] == 2.0
    assert like_rate["prior"] == pytest.approx(priors["a1"])


def test_retrain_fits_and_stores_the_factors_and_rebuilds_the_feeds_with_them(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = with_feeds(settings, {"x": plain(half_life_hours=None)}, calibrate=False)
    s = s.model_copy(update={"retrain": RetrainSettings(generator_calibration_tolerance=0.05)})
    songs = [record(f"{g}{i}", generator=g, likes=50.0 - i) for g in ("a", "b") for i in range(20)]
    writer = FeedWriter(s, store)
    writer.on_scored(songs, now=NOW)
    before = dict(store.feed_page("x", 0, 100))
    ids = [r.song_id for r in songs]
    plays = np.full(40, 200.0)
    likes = np.array([60.0] * 20 + [6.0] * 20)  # a's songs liked far above their prior, b's far below
    observed = Observed(ids, plays, likes, [r.generator for r in songs], [datetime.now(UTC)] * 40)

    out = refresh_generator_calibration(s, store, observed)
    assert out["stored"] and out["songs"] == 40
    factors = store.generator_calibration()
    assert factors == pytest.approx(out["factors"]) and factors["a"] > 1.5 > 0.7 > factors["b"]
    after = dict(store.feed_page("x", 0, 100))
    assert all(after[f"a{i}"] > before[f"a{i}"] for i in range(20))  # rebuilt with the factors
    assert all(after[f"b{i}"] < before[f"b{i}"] for i in range(20))
    FeedWriter(s, store).rebuild()
    assert dict(store.feed_page("x", 0, 100)) == pytest.approx(after)  # nothing left at the old factors
    again = refresh_generator_calibration(s, store, observed)  # the same evidence: nothing moved, no rebuild
    assert not again["stored"] and store.generator_calibration() == pytest.approx(factors)
