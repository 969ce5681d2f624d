"""The retrain gate's off-policy question (issue 16, item 8): a candidate is promoted only when its picks
from the logged exploration pools are liked more than the incumbent's, beyond the interval, on enough
matched impressions. That the retrain job asks it by default: tests/test_retrain.py."""

from __future__ import annotations

import numpy as np

from consumers.retrain_gate import verdict
from ranker.model.offpolicy import ExploredSlots
from ranker.settings import RetrainSettings, Settings
from tests.offpolicy_world import make_world


def _settings(min_matched: int) -> Settings:
    return Settings(retrain=RetrainSettings(off_policy_min_matched=min_matched))


def test_the_gate_promotes_only_picks_liked_more_beyond_the_interval() -> None:
    world = make_world(mc_draws=40_000)
    table, _ = world.serve(4000, np.random.default_rng(3))
    slots = ExploredSlots.from_impressions(table)
    truth = dict(zip(world.ids, world.rate.tolist(), strict=True))
    reverse = {s: -r for s, r in truth.items()}

    ok, why, figures = verdict(slots, truth, reverse, _settings(200))
    assert ok, why  # picking by the true like rate beats picking the worst
    assert figures["low"] > 0 and figures["candidate"]["matched"] >= 200

    ok, why, _ = verdict(slots, reverse, truth, _settings(200))
    assert not ok and "not better beyond the interval" in why

    ok, why, _ = verdict(slots, truth, truth, _settings(200))  # the same picks: a difference of 0 exactly
    assert not ok and "not better" in why

    ok, why, _ = verdict(slots, truth, reverse, _settings(10**6))
    assert not ok and "fewer than 1000000 matched impressions" in why
