"""The feed policy and the incremental feed writes, on hand-computed cases, against the real Redis."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from indexes import RedisScoreStore, SongRecord
from ranker.serving.cursor import MAX_SKIP, Cursor, CursorError
from ranker.serving.policy import (
    EPOCH,
    SCORE_FLOOR,
    Policy,
    SongState,
    beta_params,
    calibration_scale,
    explore_slots,
    posterior_mean,
)
from ranker.serving.state import PRIOR_FIELD, cold_start_quality, created_ts, model_like_rate
from ranker.serving.writer import FeedWriter, on_engagement, write_scored
from ranker.settings import FeedFilters, FeedPolicy, FeedSettings, LikeRatePrior, Settings

NOW = time.time()
HOUR = 3600.0
AESTHETIC_MID = {"coherence": 3.0, "musicality": 3.0, "memorability": 3.0, "clarity": 3.0, "naturalness": 3.0}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def record(
    song_id: str,
    *,
    likes: float = 50.0,
    streams: float = 50.0,
    age_h: float = 0.0,
    generator: str = "suno-v5",
    now: float = NOW,
    **aesthetics: float,
) -> SongRecord:
    """A scored song created ``age_h`` hours before ``now``."""
    scores = {"streams": streams, "likes": likes, **AESTHETIC_MID, **aesthetics}
    return SongRecord(
        song_id=song_id,
        model_version="test-1",
        scores=scores,
        rank_score=0.5,
        generator=generator,
        created_at=iso(now - age_h * HOUR),
        scored_at=iso(now),
    )


def with_feeds(settings: Settings, feeds: dict[str, FeedPolicy], **like_rate: object) -> Settings:
    """``settings`` with these feeds (the first is the default)."""
    feed = FeedSettings(name=next(iter(feeds)), feeds=feeds, like_rate=LikeRatePrior(**like_rate))  # type: ignore[arg-type]
    return settings.model_copy(update={"feed": feed})


def plain(**kw: object) -> FeedPolicy:
    """A feed policy without exploration or de-duplication unless asked for."""
    base: dict[str, object] = {"explore_share": 0.0, "dedup_threshold": None}
    return FeedPolicy(**{**base, **kw})  # type: ignore[arg-type]


# -- pure policy --------------------------------------------------------------------------------
def test_posterior_moves_from_prior_to_observed_rate() -> None:
    assert posterior_mean(0.1, 0, 0, 20) == pytest.approx(0.1)
    assert posterior_mean(0.1, 30, 100, 20) == pytest.approx((2 + 30) / 120)
    assert posterior_mean(0.1, 30_000, 100_000, 20) == pytest.approx(0.3, abs=1e-3)
    assert beta_params(0.1, 30, 100, 20) == pytest.approx((32.0, 88.0))
    assert beta_params(0.1, 5, 3, 20) == pytest.approx((7.0, 18.0))  # likes > plays: no negative misses


def test_calibration_scale_is_shrunk_and_clipped() -> None:
    cfg = LikeRatePrior(calibration_strength=50)
    assert calibration_scale(0, 0, cfg) == 1.0
    assert calibration_scale(150, 50, cfg) == pytest.approx(2.0)
    assert calibration_scale(10_000, 10, cfg) == cfg.calibration_max
    assert calibration_scale(150, 50, LikeRatePrior(calibrate=False)) == 1.0


def test_worked_example_of_docs_ranking_md() -> None:
    """The numbers printed in docs/ranking.md's worked example."""
    policy = Policy("cold-start", FeedPolicy(), LikeRatePrior())
    scores = {
        "streams": 62.0,
        "likes": 58.0,
        "coherence": 4.1,
        "musicality": 3.8,
        "memorability": 3.5,
        "clarity": 4.4,
        "naturalness": 3.9,
    }
    song = SongState("s1", scores, None, plays=40, likes=9, created_ts=NOW - 18 * HOUR, generator="g")
    p0 = policy.prior_rate(song, 1.2)
    assert p0 == pytest.approx(1.2 * (0.005 + 0.245 * 0.58))  # 0.176520
    m = posterior_mean(p0, 9, 40, 20)
    assert m == pytest.approx((20 * p0 + 9) / 60)  # 0.208840
    ev = policy.evaluate(song, 1.2, NOW)
    assert ev.popularity == pytest.approx((m - 0.005) / 0.245)  # 0.832000
    aes = (0.06 / 1.0) * ((4.1 - 1) / 4 + (3.8 - 1) / 4 + (3.5 - 1) / 4 + (4.4 - 1) / 4 + (3.9 - 1) / 4)
    assert ev.quality == pytest.approx(0.70 * ev.popularity + aes)  # 0.802900
    assert ev.freshness == pytest.approx(2 ** (-18 / 72))  # 0.840896
    assert ev.score == pytest.approx((0.01 + ev.quality) * ev.freshness)  # 0.683565
    assert (p0, m, ev.popularity, ev.quality, ev.freshness, ev.score) == pytest.approx(
        (0.176520, 0.208840, 0.832000, 0.802900, 0.840896, 0.683565), abs=1e-6
    )


def test_stored_score_orders_like_the_served_score_at_any_time() -> None:
    policy = Policy("f", plain(half_life_hours=12), LikeRatePrior())
    rng = np.random.default_rng(3)
    songs = [
        SongState(f"s{i}", {"likes": float(rng.uniform(0, 100)), "coherence": float(rng.uniform(1, 5))}, None,
                  0, 0, NOW - float(rng.uniform(0, 200)) * HOUR, "g")
        for i in range(200)
    ]  # fmt: skip
    stored = {s.song_id: policy.stored_score(policy.evaluate(s, 1.0, NOW).quality, s.created_ts) for s in songs}
    by_stored = sorted(stored, key=lambda k: -stored[k])
    for later in (0.0, 5 * HOUR, 400 * HOUR):
        served = {s.song_id: policy.evaluate(s, 1.0, NOW + later).score for s in songs}
        assert sorted(served, key=lambda k: -served[k]) == by_stored
        for sid in list(stored)[:5]:
            assert policy.served_score(stored[sid], NOW + later) == pytest.approx(served[sid], rel=1e-9)


def test_explore_slots() -> None:
    assert explore_slots(50, 0.1) == 5 and explore_slots(1, 0.5) == 0 and explore_slots(10, 0.0) == 0
    assert explore_slots(2, 0.5) == 1


def test_thompson_sampling_follows_the_evidence() -> None:
    policy = Policy("f", plain(), LikeRatePrior())
    good = SongState("good", {"likes": 50.0}, None, plays=400, likes=120, created_ts=NOW, generator="g")
    bad = SongState("bad", {"likes": 50.0}, None, plays=400, likes=4, created_ts=NOW, generator="g")
    fresh = SongState("new", {"likes": 50.0}, None, plays=0, likes=0, created_ts=NOW, generator="g")
    draws = policy.sample_rates([good, bad, fresh] * 2000, 1.0, np.random.default_rng(0)).reshape(-1, 3)
    means = draws.mean(axis=0)
    assert means[0] == pytest.approx((20 * 0.1275 + 120) / 420, abs=0.005)
    assert means[1] == pytest.approx((20 * 0.1275 + 4) / 420, abs=0.005)
    assert means[2] == pytest.approx(0.1275, abs=0.005)
    spread = draws.std(axis=0)
    assert spread[2] > 3 * spread[0]  # the unplayed song is the uncertain one: that is what exploration tries


def test_filters() -> None:
    f = FeedFilters(generators_include=["suno-v5", "udio"], generators_exclude=["udio"], tags_any=["lofi"],
                    tags_exclude=["explicit"], min_duration_s=30, min_age_hours=1, max_age_hours=48)  # fmt: skip
    policy = Policy("f", plain(filters=f), LikeRatePrior())

    def s(gen: str = "suno-v5", tags: tuple[str, ...] = ("lofi",), dur: float | None = 60.0) -> SongState:
        return SongState("x", {"likes": 1.0}, None, 0, 0, NOW, gen, tags, dur)

    assert policy.admits(s())
    assert not policy.admits(s(gen="udio")) and not policy.admits(s(gen="other"))
    assert not policy.admits(s(tags=("rock",))) and not policy.admits(s(tags=("lofi", "explicit")))
    assert not policy.admits(s(dur=10.0)) and not policy.admits(s(dur=None))
    assert not policy.in_age_window(NOW - 0.5 * HOUR, NOW)
    assert policy.in_age_window(NOW - 2 * HOUR, NOW) and not policy.in_age_window(NOW - 49 * HOUR, NOW)
    with pytest.raises(ValueError, match="max_age_hours"):
        FeedFilters(min_age_hours=5, max_age_hours=2)


def test_feed_settings_validation() -> None:
    assert list(FeedSettings().feeds) == ["cold-start"]
    extra = FeedSettings(feeds={"lofi": FeedPolicy()})
    assert set(extra.feeds) == {"cold-start", "lofi"} and extra.name == "cold-start"
    with pytest.raises(ValueError, match="not among feeds"):
        FeedSettings(name="lofi", feeds={"rock": FeedPolicy()})
    with pytest.raises(ValueError, match="feed names"):
        FeedSettings(feeds={"bad name": FeedPolicy()})
    with pytest.raises(ValueError, match="unknown task"):
        FeedPolicy(weights={"likes": 1, "vibes": 1})
    with pytest.raises(ValueError, match=r"finite and in \[0, 1e\+06\]"):
        FeedPolicy(weights={"likes": -1})
    for huge in (1e308, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and in"):
            FeedPolicy(weights={"likes": huge})
    for field, value in (("half_life_hours", 1e7), ("half_life_hours", math.nan), ("prior_strength", 1e16)):
        with pytest.raises(ValueError, match="less than or equal"):
            FeedPolicy(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        FeedPolicy(weights={"likes": 0})
    with pytest.raises(ValueError):
        FeedPolicy(explore_share=0.9)
    with pytest.raises(ValueError, match="rate_max"):
        LikeRatePrior(rate_min=0.3, rate_max=0.2)


def test_cursor_round_trip_and_rejections() -> None:
    cur = Cursor("cold-start", -1.2345678901234567, "song-9", frozenset({1, 2**47, 12345}))
    token = cur.encode()
    assert Cursor.decode(token, "cold-start") == cur
    with pytest.raises(CursorError, match="another feed"):
        Cursor.decode(token, "other")
    for bad in ("!!!", "AAAA", token[:-3], token + "AAAA"):
        with pytest.raises(CursorError):
            Cursor.decode(bad, "cold-start")
    # Well-formed, but past what any page writes: a taste block of 65,535 songs left (a forged cursor
    # would make a page re-order that many rows), or a skip set over MAX_SKIP.
    personal = Cursor("cold-start", 1.0, "song-9", frozenset({1}), user=7, block=(-math.inf, "", 400))
    assert Cursor.decode(personal.encode(), "cold-start", user=7) == personal
    for forged in (
        replace(personal, block=(-math.inf, "", 0xFFFF)),
        replace(personal, skip=frozenset(range(MAX_SKIP + 1))),
    ):
        with pytest.raises(CursorError, match="malformed"):
            Cursor.decode(forged.encode(), "cold-start", user=7)


def _table(counts: list[float], pct: list[float]) -> dict[str, object]:
    return {"n": 1000, "x": counts, "pct": pct}


def _transform(tables: dict[str, dict[str, object]], **extra: object) -> dict[str, object]:
    """A saved percentile-power transform (gamma 0.5), written out by hand."""
    return {"kind": "percentile-power", "format_version": 1, "gamma": 0.5, "tables": tables, **extra}


@pytest.fixture
def fresh_transform_cache() -> None:
    """model_like_rate keeps the last transform it parsed, keyed by the dict's id(); a dict freed by an
    earlier test can hand its id to a new one, so start from an empty cache."""
    import ranker.serving.state as state

    state._TRANSFORMS.clear()


def test_model_like_rate_uses_the_target_transform(fresh_transform_cache: None) -> None:
    """Rates computed here from the transform's definition (see ranker/model/targets.py).

    A score s stands for the percentile p = 100 (s/100)^(1/gamma) = 100 (s/100)^2; the count at p
    interpolates log1p(count) linearly between a table's knots. Without a like-rate curve the
    rate is expected likes / max(expected streams, 1); with one, the curve at the likes score.
    """
    from ranker.model.targets import TargetTransform

    # Knots at percentiles 0 and 100: the count at percentile p is (1 + top)^(p/100) - 1.
    # likes 50 -> p 25, likes 90 -> p 81, streams 50 -> p 25, streams 80 -> p 64.
    ratio = _transform({"likes": {"all": _table([0, 9], [0, 100])}, "streams": {"all": _table([0, 9999], [0, 100])}})
    cases = [
        (50.0, 50.0, (10**0.25 - 1) / (10000**0.25 - 1)),  # 0.778 likes / 9 streams = 0.0865
        (90.0, 50.0, (10**0.81 - 1) / (10000**0.25 - 1)),  # 5.457 / 9 = 0.606
        (50.0, 80.0, (10**0.25 - 1) / (10000**0.64 - 1)),  # 0.778 / 362 = 0.00215
    ]
    for likes, streams, want in cases:
        got = model_like_rate(ratio, {"likes": likes, "streams": streams}, "g", iso(NOW))
        assert got == pytest.approx(want, rel=1e-12), (likes, streams)
    # Fewer than one expected stream counts as one (streams 1 -> percentile 0.01 -> 0.0009 streams), and the
    # rate is clipped to 1: likes 90 stands for 5.5 likes.
    assert model_like_rate(ratio, {"likes": 90.0, "streams": 1.0}, "g", iso(NOW)) == 1.0

    # With a like-rate curve the likes score alone decides: linear between the curve's knots.
    curve = {**ratio, "like_rate": {"x": [0.0, 50.0, 100.0], "y": [0.01, 0.05, 0.2]}}
    for likes, want in [(90.0, 0.05 + 0.8 * 0.15), (20.0, 0.01 + 0.4 * 0.04), (50.0, 0.05), (100.0, 0.2)]:
        for streams in (5.0, 95.0):
            got = model_like_rate(curve, {"likes": likes, "streams": streams}, "g", iso(NOW))
            assert got == pytest.approx(want, rel=1e-12), (likes, streams)

    # A transform fitted on data (with its curve): increasing in the likes score.
    rng = np.random.default_rng(0)
    streams = rng.lognormal(6, 1.5, 5000).round()
    likes = (streams * rng.beta(2, 30, 5000)).round()
    fitted = TargetTransform.fit({"streams": streams, "likes": likes}).to_dict()
    hi = model_like_rate(fitted, {"likes": 90.0, "streams": 50.0}, "g", iso(NOW))
    lo = model_like_rate(fitted, {"likes": 20.0, "streams": 50.0}, "g", iso(NOW))
    assert hi is not None and lo is not None and 0 < lo < hi <= 1
    assert hi == pytest.approx(float(TargetTransform.from_dict(fitted).expected_rate(90.0, 50.0)[0]), rel=1e-12)
    assert model_like_rate(None, {"likes": 90.0, "streams": 50.0}, "g", iso(NOW)) is None
    assert model_like_rate(ratio, {"likes": 90.0}, "g", iso(NOW)) is None  # no streams score: no rate


def test_model_like_rate_reads_the_songs_generator_week_cohort(fresh_transform_cache: None) -> None:
    """A cohort transform looks a song up in its generator's ISO week, else its generator, else all songs."""
    week = datetime(2026, 2, 10, 12, tzinfo=UTC)  # a Tuesday of ISO week 2026-W07
    cohort = "cohort:suno-v5|2026-W07"
    transform = _transform(
        {
            "likes": {
                "all": _table([0, 99], [0, 100]),
                "generator:suno-v5": _table([0, 999], [0, 100]),
                cohort: _table([0, 9999], [0, 100]),
            },
            "streams": {
                "all": _table([0, 9999], [0, 100]),
                "generator:suno-v5": _table([0, 9999], [0, 100]),
                cohort: _table([0, 99999], [0, 100]),
            },
        },
        cohort="generator_week",
        min_cohort_size=1,
    )
    scores = {"likes": 50.0, "streams": 50.0}  # percentile 25 in every table: count (1 + top)^0.25 - 1
    cases = [
        ("suno-v5", week, (10000**0.25 - 1) / (100000**0.25 - 1)),  # its week's cohort: 9 / 16.78
        ("suno-v5", week + timedelta(days=7), (1000**0.25 - 1) / (10000**0.25 - 1)),  # no cohort that week
        ("udio", week, (100**0.25 - 1) / (10000**0.25 - 1)),  # a generator without tables: all songs
    ]
    for generator, created, want in cases:
        got = model_like_rate(transform, scores, generator, created.isoformat())
        assert got == pytest.approx(want, rel=1e-12), (generator, created)
    # Week boundaries are UTC: Sunday 23:30 in New York is Monday in UTC, the next ISO week.
    sunday_ny = datetime(2026, 2, 15, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    got = model_like_rate(transform, scores, "suno-v5", sunday_ny.isoformat())
    assert got == pytest.approx((1000**0.25 - 1) / (10000**0.25 - 1), rel=1e-12)
    assert model_like_rate(transform, scores, "suno-v5", (week - timedelta(days=1)).isoformat()) == pytest.approx(
        (10000**0.25 - 1) / (100000**0.25 - 1), rel=1e-12
    )


# -- feeds in Redis ------------------------------------------------------------------------------
def test_scored_songs_land_in_every_feed_they_pass_in_formula_order(settings: Settings, store: RedisScoreStore) -> None:
    hand = plain(weights={"likes": 1.0, "coherence": 1.0}, half_life_hours=24, prior_strength=10)
    suno = plain(filters=FeedFilters(generators_include=["suno-v5"]))
    s = with_feeds(settings, {"hand": hand, "suno": suno})
    writer = FeedWriter(s, store)
    songs = [
        record("A", likes=50, coherence=5.0, age_h=0),  # Q = (0.5 + 1)/2 = 0.75    score 0.76
        record("B", likes=90, coherence=3.0, age_h=24),  # Q = (0.9 + 0.5)/2 = 0.7   score 0.71/2 = 0.355
        record("C", likes=10, coherence=1.0, age_h=1, generator="udio"),  # Q = 0.05  0.06*2^(-1/24)
        record("D", likes=100, coherence=5.0, age_h=48),  # Q = 1                    score 1.01/4 = 0.2525
    ]
    writer.on_scored(songs, now=NOW)
    page = store.feed_page("hand", 0, 10)
    assert [sid for sid, _ in page] == ["A", "B", "D", "C"]
    expected = {"A": (0.75, 0), "B": (0.7, 24), "C": (0.05, 1), "D": (1.0, 48)}
    for sid, stored in page:
        q, age = expected[sid]
        assert stored == pytest.approx(
            math.log(SCORE_FLOOR + q) + math.log(2) * (NOW - age * HOUR - EPOCH) / (24 * HOUR)
        )
        policy = writer.policies["hand"]
        assert policy.served_score(stored, NOW) == pytest.approx((0.01 + q) * 2 ** (-age / 24))
    assert sorted(sid for sid, _ in store.feed_page("suno", 0, 10)) == ["A", "B", "D"]  # udio filtered out
    assert store.get_song("A") is not None and store.get_song("A")["score.likes"] == "50.0"  # type: ignore[index]


def test_plays_with_few_likes_sink_and_many_likes_rise(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibrate=False)
    writer = FeedWriter(s, store)
    writer.on_scored([record(x, likes=50) for x in ("unplayed", "flop", "hit")], now=NOW)
    first = [sid for sid, _ in store.feed_page("f", 0, 3)]
    assert sorted(first) == ["flop", "hit", "unplayed"]  # one prior, one score: ties
    r = store.client
    for sid, plays, likes in (("flop", 200, 2), ("hit", 200, 100)):
        key = store.song_key(sid)
        r.hincrby(key, "eng.plays", plays)
        r.hincrby(key, "eng.likes", likes)
    assert on_engagement(["flop", "hit", "never-scored"], s) == 2
    assert [sid for sid, _ in store.feed_page("f", 0, 3)] == ["hit", "unplayed", "flop"]
    # by the formula: prior 0.1275; flop (2.55 + 2)/220 = 0.0207, hit (2.55 + 100)/220 = 0.466
    policy = writer.policies["f"]
    stored = dict(store.feed_page("f", 0, 3))
    flop_pop = ((2.55 + 2) / 220 - 0.005) / 0.245
    q_flop = 0.7 * flop_pop + 0.3 * 0.5
    assert policy.served_score(stored["flop"], NOW) == pytest.approx(0.01 + q_flop)
    # the scored counterpart keeps engagement already counted (a rescore does not reset evidence)
    writer.on_scored([record("flop", likes=50)], now=NOW)
    assert dict(store.feed_page("f", 0, 3))["flop"] == pytest.approx(stored["flop"])


def test_engagement_before_scores_waits_in_the_hash(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain()}, calibrate=False)
    writer = FeedWriter(s, store)
    store.client.hincrby(store.song_key("early"), "eng.plays", 50)
    assert writer.on_engagement(["early"], now=NOW) == 0
    assert store.feed_size("f") == 0
    writer.on_scored([record("early", likes=50), record("other", likes=50)], now=NOW)
    assert [sid for sid, _ in store.feed_page("f", 0, 2)] == ["other", "early"]  # 50 plays, 0 likes


def test_calibration_scales_the_prior(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain()}, calibration_strength=10)
    writer = FeedWriter(s, store)
    writer.on_scored([record("a", likes=50), record("b", likes=50)], now=NOW)
    key = store.song_key("a")
    store.client.hincrby(key, "eng.plays", 100)
    store.client.hincrby(key, "eng.likes", 40)
    writer.on_engagement(["a"], now=NOW)
    likes, expected = store.calibration_totals()
    assert (likes, expected) == pytest.approx((40.0, 100 * 0.1275))
    assert writer.scale() == pytest.approx((40 + 10) / (12.75 + 10))
    writer.on_engagement(["a"], now=NOW)  # nothing new: claimed once only
    assert store.calibration_totals() == pytest.approx((40.0, 12.75))
    store.client.hincrby(key, "eng.plays", 100)
    writer.on_engagement(["a", "a"], now=NOW)
    assert store.calibration_totals() == pytest.approx((40.0, 25.5))


@pytest.mark.parametrize("one_script", [True, False], ids=["one-script", "per-song (cluster fallback)"])
def test_a_rescore_recalibrates_at_the_new_prior(settings: Settings, store: RedisScoreStore, one_script: bool) -> None:
    """After a promotion the scale must measure the new model, not keep correcting the old one."""
    store.multi_key_scripts = one_script
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibration_strength=10)
    writer = FeedWriter(s, store)
    old = [SongRecord(**{**record(x, likes=50).__dict__, "extra": {PRIOR_FIELD: 0.1}}) for x in ("a", "b")]
    writer.on_scored(old, now=NOW)
    for sid in ("a", "b"):
        store.client.hincrby(store.song_key(sid), "eng.plays", 100)
        store.client.hincrby(store.song_key(sid), "eng.likes", 20)
    writer.on_engagement(["a", "b"], now=NOW)
    assert store.calibration_totals() == pytest.approx((40.0, 20.0))  # the old model predicted half the likes
    assert writer.scale() == pytest.approx(50 / 30)
    # A new model predicts 0.2 for both: right on. Its scale is 1, not the old model's 5/3.
    new = [SongRecord(**{**r.__dict__, "extra": {PRIOR_FIELD: 0.2}}) for r in old]
    assert writer.recalibrate(new) == pytest.approx(1.0)
    assert store.calibration_totals() == pytest.approx((40.0, 40.0))
    assert writer.recalibrate(new) == pytest.approx(1.0)  # idempotent: each song is counted once
    assert store.calibration_totals() == pytest.approx((40.0, 40.0))
    assert writer.recalibrate([]) == pytest.approx(1.0)
    off = FeedWriter(with_feeds(settings, {"f": plain()}, calibrate=False), store)
    assert off.recalibrate(new) == 1.0


def test_model_prior_field_wins_over_the_fallback(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibrate=False)
    writer = FeedWriter(s, store)
    low = record("low", likes=90)
    high = record("high", likes=10)
    writer.on_scored(
        [
            SongRecord(**{**low.__dict__, "extra": {PRIOR_FIELD: 0.01}}),
            SongRecord(**{**high.__dict__, "extra": {PRIOR_FIELD: 0.2}}),
        ],
        now=NOW,
    )
    assert [sid for sid, _ in store.feed_page("f", 0, 2)] == ["high", "low"]
    assert cold_start_quality(s, high.scores, 0.2) > cold_start_quality(s, low.scores, 0.01)


def test_age_limited_feed_trims_and_rebuild_recomputes(settings: Settings, store: RedisScoreStore) -> None:
    young = plain(filters=FeedFilters(max_age_hours=24))
    s = with_feeds(settings, {"all": plain(), "young": young})
    writer = FeedWriter(s, store)
    writer.on_scored([record("new", age_h=1), record("old", age_h=30)], now=NOW)
    assert [sid for sid, _ in store.feed_page("young", 0, 5)] == ["new"]
    assert store.feed_size("all") == 2
    assert writer.trim(now=NOW + 25 * HOUR) == 1  # "new" is 26 h old by then
    assert store.feed_size("young") == 0
    store.client.delete(store.feed_key("all"))
    assert writer.rebuild(now=NOW) == {"all": 2, "young": 1}
    assert [sid for sid, _ in store.feed_page("all", 0, 5)] == ["new", "old"]
    assert [sid for sid, _ in store.feed_page("young", 0, 5)] == ["new"]


def test_creation_time_is_bounded_by_scored_at_not_the_clock() -> None:
    scored = iso(NOW)
    assert created_ts(iso(NOW - 5 * HOUR), scored) == pytest.approx(NOW - 5 * HOUR)
    assert created_ts("9999-12-31T00:00:00+00:00", scored) == pytest.approx(NOW)
    assert created_ts(None, scored) == created_ts("not a time", scored) == pytest.approx(NOW)
    # no readable scored_at: nothing in the hash bounds a future date; EPOCH is the fixed fallback
    assert created_ts("9999-12-31T00:00:00+00:00", None) == EPOCH
    assert created_ts(None, "garbage") == EPOCH
    assert created_ts("2024-06-01T00:00:00+00:00", None) < EPOCH  # an earlier date stands


def test_engagement_never_re_dates_a_future_song(settings: Settings, store: RedisScoreStore) -> None:
    """A song dated in the future keeps the freshness of its scoring time, whenever engagement arrives."""
    s = with_feeds(settings, {"f": plain(half_life_hours=24)}, calibrate=False)
    writer = FeedWriter(s, store)
    song = SongRecord(**{**record("future", likes=50).__dict__, "created_at": "9999-12-31T23:59:59+00:00"})
    write_scored(store, s, [song, record("today", likes=50)])
    policy = writer.policies["f"]
    scored = NOW  # record() scores at NOW

    def stored() -> float:
        return dict(store.feed_page("f", 0, 10))["future"]

    def expected(plays: float, likes: float) -> float:
        state = SongState("future", song.scores, None, plays, likes, scored, song.generator)
        return policy.stored_score(policy.evaluate(state, 1.0, scored).quality, scored)

    assert stored() == pytest.approx(expected(0, 0), abs=1e-9)
    key = store.song_key("future")
    for later, plays, likes in ((5 * HOUR, 100, 30), (50 * HOUR, 300, 31)):
        store.client.hset(key, mapping={"eng.plays": plays, "eng.likes": likes})
        assert writer.on_engagement(["future"], now=NOW + later) == 1
        assert stored() == pytest.approx(expected(plays, likes), abs=1e-9)
    # the freshness term is that of scored_at, not of either engagement's clock
    quality = policy.evaluate(SongState("future", song.scores, None, 300, 31, scored, "g"), 1.0, scored).quality
    assert stored() - math.log(SCORE_FLOOR + quality) == pytest.approx(policy.decay * (scored - EPOCH), abs=1e-9)
    assert writer.rebuild(now=NOW + 500 * HOUR) == {"f": 2}
    assert stored() == pytest.approx(expected(300, 31), abs=1e-9)
