"""The loop simulation's issue-16 world and reports: listeners' tastes, attention down the page, the
off-policy check's truth, and what a promotion did to the like rate (docs/loop-simulation.md)."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from consumers.loop_offpolicy import play_inclusion
from consumers.loop_report import LoopResult, PolicyOutcome
from consumers.loop_world import LoopConfig, _build_world, _Song, _World, loop_config
from ranker.settings import Settings


def test_a_like_at_depth_is_scaled_by_the_examination_decay() -> None:
    world = _World([_Song("a", "lofi", "g", 0, 0.2, Path("a.wav"))], ["rock"], datetime(2026, 1, 1, tzinfo=UTC))
    cfg = LoopConfig(examination_decay=0.5)
    top = world.like_probability(0, 0, cfg, 0)
    assert top == pytest.approx(0.2)  # no style match, no taste term
    assert world.like_probability(0, 0, cfg, 3) == pytest.approx(0.2 * 4**-0.5)
    assert world.like_probability(0, 0, LoopConfig(), 3) == pytest.approx(0.2)  # the documented world: no decay


def test_listeners_prefer_their_own_clusters_songs(tmp_path: Path) -> None:
    """Each taste is its style's centre plus noise: on average a listener's taste term is higher for songs of
    their own style than for the others (the truth a personal feed can learn from the same embeddings)."""
    cfg = LoopConfig(taste_strength=2.0, taste_noise=0.5, duration_s=1.0)
    settings = Settings(encoder="logmel")
    world = _build_world(songs=24, users=30, hours=2, seed=5, out_dir=tmp_path, cfg=cfg, settings=settings)
    assert world.taste is not None and world.taste.shape == (30, 24)
    assert np.abs(world.taste).max() <= 2.0 + 1e-9  # taste_strength x a cosine
    own: list[float] = []
    other: list[float] = []
    for u, style in enumerate(world.user_styles):
        for i, song in enumerate(world.songs):
            (own if song.style == style else other).append(float(world.taste[u, i]))
    assert own and other and np.mean(own) > np.mean(other) + 0.3, (np.mean(own), np.mean(other))
    # the affinity adds the taste term to the style boost (0 when the taste world replaces styles)
    plain = LoopConfig(style_boost=0.0, taste_strength=2.0)
    p = world.like_probability(0, 0, plain)
    logit = math.log(world.songs[0].like_prob / (1 - world.songs[0].like_prob)) + world.taste[0, 0]
    assert p == pytest.approx(1 / (1 + math.exp(-logit)))


def test_play_inclusion_is_position_biased_and_counts_the_plays() -> None:
    q = play_inclusion(10, 3, seed=1)
    assert q.sum() == pytest.approx(3.0)  # three plays a page
    assert all(a > b for a, b in itertools.pairwise(q))  # weight 1 / (1 + position): falls down the page
    # exact, by enumerating the ordered draws of 3 of 10 positions with weights 1 / (1 + k), as _pick draws them
    assert q[0] == pytest.approx(0.7641, abs=0.01) and q[9] == pytest.approx(0.1258, abs=0.01)


def test_a_promotions_effect_is_the_next_hour_against_evidence_alone() -> None:
    evidence = PolicyOutcome(plays=[10, 10, 10], likes=[1, 1, 1], expected_likes=[1.0, 1.0, 1.0])
    retrain = PolicyOutcome(plays=[10, 10, 10], likes=[1, 1, 1], expected_likes=[1.0, 1.5, 0.5])
    retrain.promotions, retrain.promotion_hours = 2, [0, 1]
    result = LoopResult(1, 3, 1, 3, {"prior+evidence": evidence, "prior+evidence+retrain": retrain})
    effects = result.promotion_effects("prior+evidence+retrain")
    assert effects == [(0, pytest.approx(0.05)), (1, pytest.approx(-0.05))]  # raised, then lowered
    assert result.to_dict()["promotion_effects"] == {"prior+evidence+retrain": effects}


def test_the_new_knobs_parse_and_are_checked() -> None:
    cfg = loop_config(["taste_strength=2", "examination_decay=0.5", "taste_weight=0", "taste_evidence_half=20"])
    assert (cfg.taste_strength, cfg.examination_decay, cfg.taste_weight, cfg.taste_evidence_half) == (2, 0.5, 0, 20)
    with pytest.raises(ValueError, match="taste_strength"):
        LoopConfig(taste_strength=-1.0)


def test_the_issue16_policies_run_on_the_real_stack(settings: Settings, tmp_path: Path) -> None:
    """A small taste world through every new policy: each is served and played every hour, personal pages never
    show a listener a song they played before, and the off-policy check's estimate comes with its truth."""
    import pyarrow.compute as pc

    from consumers.simulate_loop import run_loop_simulation
    from indexes.engagement_log import EngagementLog
    from indexes.served_log import ServedLog

    cfg = LoopConfig(taste_strength=2.0, style_boost=0.0, examination_decay=0.5, history_songs=60, duration_s=1.0)
    policies = ["prior+evidence", "plain-evidence", "personal", "heard-excluded", "retrain+gate"]
    result = run_loop_simulation(
        settings, songs=30, users=12, hours=3, seed=4, out_dir=tmp_path, policies=policies, config=cfg
    )
    assert list(result.outcomes) == policies
    assert all(sum(o.plays) == 12 * 3 * 3 for o in result.outcomes.values())
    assert all(result.outcomes[p].posterior_spearman is not None for p in policies)
    check = result.outcomes["prior+evidence"].off_policy
    assert check is not None and check["n"] > 0 and 0.0 <= check["truth"] <= 1.0, check
    for p in ("personal", "heard-excluded"):
        state = next((tmp_path / "policies").glob(p)) / "state"
        served = ServedLog(state / "served", f"{_tag(state)}.feeds.served").read()
        plays = EngagementLog(state / "engagement", f"{_tag(state)}.engagement").read()
        plays = plays.filter(pc.equal(plays.column("type"), "play"))
        played: dict[str, list[tuple[object, str]]] = {}
        for user, song, ts in zip(*(plays.column(c).to_pylist() for c in ("user_id", "song_id", "ts")), strict=True):
            played.setdefault(user, []).append((ts, song))
        for user, songs, at in zip(
            *(served.column(c).to_pylist() for c in ("user_id", "song_ids", "served_at")), strict=True
        ):
            assert user is not None  # a personal page names its listener
            before = {song for ts, song in played.get(user, []) if ts < at}
            assert not before & set(songs), (p, user, before & set(songs))


def _tag(state: Path) -> str:
    """The policy's topic prefix (its Redis prefix too), read back from the engagement log's file names."""
    name = next((state / "engagement").glob("*/*.parquet")).name
    return name.split(".engagement-")[0]
