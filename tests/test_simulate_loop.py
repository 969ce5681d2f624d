"""The seeded feedback-loop simulation on the real stack: evidence lifts the like rate.

A small world (one seed) run through the real worker, feedback consumer, API and retrain
job under every policy; see docs/loop-simulation.md for the design and the full-size runs.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from consumers.simulate_loop import (
    POLICIES,
    LoopConfig,
    _Song,
    _World,
    audience_like_rates,
    loop_config,
    run_loop_simulation,
)
from ranker.settings import Settings

SMALL = LoopConfig(history_songs=120, history_epochs=30, idle_s=0.5)


def test_loop_simulation_orders_policies_by_like_rate(settings: Settings, tmp_path: Path) -> None:
    result = run_loop_simulation(settings, songs=60, users=60, hours=5, seed=6, out_dir=tmp_path, config=SMALL)

    assert list(result.outcomes) == list(POLICIES)
    assert all(sum(o.plays) == 60 * 3 * 5 for o in result.outcomes.values())  # every user played every hour
    assert result.json_path is not None and result.json_path.is_file()
    rate = result.expected_like_rates()
    observed = result.like_rates()
    print(f"expected {rate}\nobserved {observed}\nprior Spearman {result.prior_spearman}")  # pytest -s shows it
    # The order the issue asks for, in the expected like rate (the mean true like probability of the songs
    # played; the observed rate adds coin flips: 900 plays a policy leave it about +-0.012 of noise).
    # The initial head's prior is informative: prior-only beats newest-first and random.
    assert result.prior_spearman is not None and result.prior_spearman > 0.3, result.prior_spearman
    assert rate["prior-only"] > max(rate["newest"], rate["random"]), rate
    # Evidence (counted by the real feedback consumer, read back through the API) beats every policy without it.
    with_evidence, without = ("prior+evidence", "prior+evidence+retrain"), ("random", "newest", "prior-only")
    for w in with_evidence:
        for wo in without:
            assert rate[w] > rate[wo], (w, wo, rate)
    assert np.mean([observed[w] for w in with_evidence]) > np.mean([observed[w] for w in without]), observed
    # Retraining ran; its gate keeps it from costing the feed much. It is NOT shown to beat evidence alone
    # (docs/loop-simulation.md: small retraining sets chosen by the feed, and a holdout whose selection
    # depends on its own likes).
    assert result.outcomes["prior+evidence+retrain"].retrains >= 1
    assert rate["prior+evidence+retrain"] > rate["prior+evidence"] - 0.02, rate


def test_the_audience_like_rate_averages_the_listeners_style_boost() -> None:
    songs = [_Song("a", "lofi", "g", 0, 0.1, Path("a.wav")), _Song("b", "rock", "g", 0, 0.1, Path("b.wav"))]
    world = _World(songs, ["lofi", "lofi", "lofi", "jazz"], datetime(2026, 1, 1, tzinfo=UTC))
    rates = audience_like_rates(world, LoopConfig(style_boost=1.0))
    boosted = 1 / (1 + math.exp(-(math.log(0.1 / 0.9) + 1.0)))
    assert rates["a"] == pytest.approx(0.75 * boosted + 0.25 * 0.1)  # three of four listeners share its style
    assert rates["b"] == pytest.approx(0.1)  # nobody does


def test_loop_config_overrides_parse_and_refuse_unknown_keys() -> None:
    cfg = loop_config(["history_songs=60", "retrain_lr=0.001", "audience_weights=consonance:0.2,clean:1.5"])
    assert cfg.history_songs == 60 and cfg.retrain_lr == 0.001 and cfg.retrain_batch_size is None
    other = loop_config(["retrain_targets=counts", "half_life_hours=2"])
    assert other.retrain_targets == "counts" and other.half_life_hours == 2.0
    with pytest.raises(ValueError, match="retrain_targets"):
        loop_config(["retrain_targets=likes"])
    with pytest.raises(ValueError, match="half_life_hours"):
        loop_config(["half_life_hours=0"])
    assert cfg.audience_weights == (("consonance", 0.2), ("clean", 1.5))
    with pytest.raises(ValueError, match="KEY one of"):
        loop_config(["history=60"])
    with pytest.raises(ValueError, match="retrain_epochs"):
        loop_config(["retrain_epochs=many"])
    with pytest.raises(ValueError, match="page_size out of range"):
        loop_config(["page_size=0"])
    with pytest.raises(ValueError, match="unknown audience_weights"):
        loop_config(["audience_weights=loudness:1"])
