"""The off-policy estimator (ranker/model/offpolicy.py): exact weights on hand-built pages, and interval
coverage of a candidate's true like rate in a synthetic world where the logged propensity follows quality."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from ranker.model.offpolicy import ExploredSlots, compare_slots, evaluate_picks, evaluate_slots
from tests.offpolicy_world import World, make_world


def page_rows(rows: list[tuple[str, str, bool, float | None, list[str] | None, int, int]]) -> pa.Table:
    """(request_id, song_id, explored, propensity, pool, plays, likes) rows as an impressions table."""
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "request_id": pa.array(cols[0], pa.string()),
            "song_id": pa.array(cols[1], pa.string()),
            "position": pa.array(range(len(rows)), pa.int32()),
            "explored": pa.array(cols[2], pa.bool_()),
            "propensity": pa.array(cols[3], pa.float64()),
            "pool": pa.array(cols[4], pa.list_(pa.string())),
            "plays": pa.array(cols[5], pa.int32()),
            "likes": pa.array(cols[6], pa.int32()),
        }
    )


POOL1 = ["a", "b", "c", "d"]
PAGES = page_rows(
    [
        ("r1", "d", False, 1.0, None, 5, 5),  # an exploit slot: never counted
        ("r1", "a", True, 0.5, POOL1, 2, 1),
        ("r1", "c", True, 0.25, POOL1, 1, 1),
        ("r2", "b", True, 0.8, ["b", "c"], 1, 0),
    ]
)


def test_weights_on_hand_built_pages() -> None:
    # Candidate picks a, b on r1 (2 slots) and b on r2: a (w = 2) and b (w = 1.25) match, c does not.
    est = evaluate_picks(PAGES, {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}, resamples=200, seed=1)
    assert est.value == pytest.approx((2 * 1 + 1.25 * 0) / (2 * 2 + 1.25 * 1))
    assert (est.n, est.requests, est.matched, est.matched_plays, est.matched_likes) == (3, 2, 2, 3, 1)
    assert est.ess == pytest.approx((2 + 1.25) ** 2 / (2**2 + 1.25**2))
    assert est.logged_rate == pytest.approx(2 / 4)
    assert est.invalid == 0
    assert not est.enough  # 2 matches < the default minimum
    assert est.low <= est.value <= est.high

    # b unscored: the candidate would not show it, so it fills r1 with a, c and r2 with c (not logged).
    est = evaluate_picks(PAGES, {"a": 3.0, "c": 1.0, "d": 0.0}, resamples=0)
    assert est.value == pytest.approx((2 * 1 + 4 * 1) / (2 * 2 + 4 * 1))
    assert est.matched == 2
    assert math.isnan(est.low)  # no resamples: no bootstrap interval

    # Ties go to the earlier pool entry: a, b on r1 and b on r2, as the first candidate.
    tied = evaluate_picks(PAGES, dict.fromkeys(POOL1, 1.0), resamples=0)
    assert tied.value == pytest.approx(2 / 5.25)


def test_a_like_without_its_play_counts_at_most_one_like_per_play() -> None:
    # r1's explored a: 1 play, 3 likes (two plays lost, or a client that sends likes alone); b: 0 plays, 1 like.
    rows = page_rows([("r1", "a", True, 0.5, ["a", "b"], 1, 3), ("r1", "b", True, 0.5, ["a", "b"], 0, 1)])
    est = evaluate_picks(rows, {"a": 2.0, "b": 1.0}, resamples=0)
    assert est.value == pytest.approx(1.0)  # not 3 (or 4) likes per play
    assert (est.matched_plays, est.matched_likes) == (1, 1)
    assert est.logged_rate == pytest.approx(1.0)


def test_bad_rows_are_left_out_and_counted() -> None:
    table = page_rows(
        [
            ("r1", "a", True, 0.5, POOL1, 2, 1),
            ("r2", "a", True, 0.0, POOL1, 9, 9),  # impossible propensity for a logged song
            ("r3", "a", True, None, POOL1, 9, 9),
            ("r4", "a", True, 1.5, POOL1, 9, 9),
            ("r5", "a", True, 0.5, [], 9, 9),  # explored from no pool
            ("r6", "a", True, 0.5, None, 9, 9),
        ]
    )
    est = evaluate_picks(table, {"a": 1.0}, resamples=0, min_matched=1)
    assert (est.invalid, est.n, est.matched, est.value) == (5, 1, 1, 0.5)
    assert est.enough


def test_nothing_explored_gives_no_estimate() -> None:
    est = evaluate_picks(PAGES.filter(pa.array([True, False, False, False])), {"d": 1.0})
    assert (est.n, est.matched, est.ess) == (0, 0, 0.0)
    assert math.isnan(est.value) and math.isnan(est.low) and math.isnan(est.logged_rate)
    assert est.to_dict()["value"] is None
    with pytest.raises(ValueError, match="pool"):
        evaluate_picks(PAGES.drop_columns(["pool"]), {"a": 1.0})
    with pytest.raises(ValueError, match="level"):
        evaluate_picks(PAGES, {"a": 1.0}, level=1.0)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def test_interval_is_seeded(world: World) -> None:
    table, _ = world.serve(200, np.random.default_rng(5))
    scores = {s: float(-world.rate[j]) for j, s in enumerate(world.ids)}
    a = evaluate_picks(table, scores, seed=3)
    assert a == evaluate_picks(table, scores, seed=3)
    assert (a.low, a.high) != (evaluate_picks(table, scores, seed=4).low, evaluate_picks(table, scores, seed=4).high)
    narrow = evaluate_picks(table, scores, seed=3, level=0.5)
    assert a.low < narrow.low <= narrow.high < a.high


REPLICATIONS = 200
PAGES_PER_LOG = 500


def test_interval_covers_the_candidates_true_like_rate(world: World) -> None:
    """A candidate unrelated to the logger (fixed random scores) on 200 seeded logs of 500 pages: its 95%
    interval covers the true rate of its picks in >= 85% of them. The logger favours good songs, so the
    logged rate is far above the candidate's, and unweighted matches (no 1/p) land well above it too."""
    scores = {s: float(v) for s, v in zip(world.ids, np.random.default_rng(3).random(len(world.ids)), strict=True)}
    covered = delta_covered = 0
    half_widths, values, truths, logged = [], [], [], []
    for rep in range(REPLICATIONS):
        table, pool_counts = world.serve(PAGES_PER_LOG, np.random.default_rng(10_000 + rep))
        truth = world.true_rate(scores, pool_counts)
        est = evaluate_slots(ExploredSlots.from_impressions(table), scores, seed=rep)
        covered += est.low <= truth <= est.high
        delta_covered += est.delta_low <= truth <= est.delta_high
        half_widths.append((est.high - est.low) / 2)
        values.append(est.value)
        truths.append(truth)
        logged.append(est.logged_rate)
        assert est.enough  # ~350 matches a log
    assert covered >= 0.85 * REPLICATIONS, covered
    assert delta_covered >= 0.8 * REPLICATIONS, delta_covered
    assert np.mean(half_widths) < 0.1  # an interval that covers by being huge does not pass
    bias = np.mean(values) - np.mean(truths)
    assert abs(bias) < 0.01, bias
    assert np.mean(logged) - np.mean(truths) > 0.05  # the logged rate is no stand-in for the candidate's


def test_paired_comparison_finds_the_better_candidate(world: World) -> None:
    """Quality-ordered scores against fixed random ones on 100 seeded logs: the paired interval of the
    difference covers the true difference (about 0.12) in >= 85% of them, calls the better one better in
    most (about 70%: the random candidate's ~360 matches leave a half-width near 0.1) and never the worse."""
    good = {s: float(world.rate[j]) for j, s in enumerate(world.ids)}
    noise = {s: float(v) for s, v in zip(world.ids, np.random.default_rng(3).random(len(world.ids)), strict=True)}
    covered = better = worse = 0
    for rep in range(100):
        table, pool_counts = world.serve(PAGES_PER_LOG, np.random.default_rng(20_000 + rep))
        truth = world.true_rate(good, pool_counts) - world.true_rate(noise, pool_counts)
        slots = ExploredSlots.from_impressions(table)
        cmp = compare_slots(slots, good, noise, seed=rep, resamples=500)
        covered += cmp.low <= truth <= cmp.high
        better += cmp.better
        worse += compare_slots(slots, noise, good, seed=rep, resamples=200).better
        if rep == 0:  # each side is exactly the single estimate with the same seed
            assert cmp.candidate == evaluate_slots(slots, good, seed=0, resamples=500)
            assert cmp.incumbent == evaluate_slots(slots, noise, seed=0, resamples=500)
            assert cmp.difference == pytest.approx(cmp.candidate.value - cmp.incumbent.value)
            same = compare_slots(slots, good, good, resamples=100)
            assert (same.difference, same.low, same.high, same.better) == (0.0, 0.0, 0.0, False)
    assert covered >= 85, covered
    assert better >= 60, better
    assert worse == 0


def test_no_liked_match_still_gets_an_interval_of_some_width() -> None:
    """With no matched play liked, every bootstrap resample gives 0 and the percentile interval would be
    [0, 0]: certainty from a handful of plays. The Wilson interval on the effective plays replaces it."""
    rows = [(f"r{i}", "a", True, 0.5, POOL1, 1, 0) for i in range(20)]  # 20 matched plays, no like
    est = evaluate_picks(page_rows(rows), {"a": 1.0}, resamples=200, seed=3)
    assert est.value == 0.0 and est.low == 0.0
    z2 = 1.959963984540054**2
    assert est.high == pytest.approx(z2 / (20 + z2), rel=1e-6)  # Wilson's upper bound at 0 of 20: 0.161
    liked = [(f"r{i}", "a", True, 0.5, POOL1, 1, 1) for i in range(20)]  # every one liked: the mirror image
    est = evaluate_picks(page_rows(liked), {"a": 1.0}, resamples=200, seed=3)
    assert est.high == 1.0 and est.low == pytest.approx(20 / (20 + z2), rel=1e-6)
