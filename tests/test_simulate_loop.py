"""The seeded feedback-loop simulation on the real stack: evidence, then retraining, lift the like rate.

The documented world (one seed of five) run through the real worker, feedback consumer, API and
retrain job under every policy; see docs/loop-simulation.md for the design and all the runs.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.loop_world import (
    LISTENER_WEIGHTS,
    LoopConfig,
    _Song,
    _World,
    audience_like_rates,
    loop_config,
)
from consumers.simulate_loop import POLICIES, run_loop_simulation
from ranker.settings import Settings


def test_loop_simulation_orders_policies_by_like_rate(settings: Settings, tmp_path: Path) -> None:
    # The documented world (docs/loop-simulation.md: 96 mel bands, the default LoopConfig), seed 3: the
    # test checks the table's row for that seed, on the real worker, feedback consumer, API and retrain job.
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"logmel_n_mels": 96})})
    result = run_loop_simulation(settings, songs=120, users=100, hours=6, seed=3, out_dir=tmp_path)

    assert list(result.outcomes) == list(POLICIES)
    assert all(sum(o.plays) == 100 * 3 * 6 for o in result.outcomes.values())  # every user played every hour
    assert result.json_path is not None and result.json_path.is_file()
    rate = result.expected_like_rates()
    observed = result.like_rates()
    print(f"expected {rate}\nobserved {observed}\nprior Spearman {result.prior_spearman}")  # pytest -s shows it
    # The order the issue asks for, in the expected like rate (the mean true like probability of the songs
    # played; the observed rate adds coin flips: 1,800 plays a policy leave it about +-0.009 of noise).
    # The initial head's prior is informative: prior-only beats newest-first and random.
    assert result.prior_spearman is not None and result.prior_spearman > 0.2, result.prior_spearman
    assert rate["prior-only"] > max(rate["newest"], rate["random"]), rate
    # Evidence (counted by the real feedback consumer, read back through the API) beats every policy without it.
    with_evidence, without = ("prior+evidence", "prior+evidence+retrain"), ("random", "newest", "prior-only")
    for w in with_evidence:
        for wo in without:
            assert rate[w] > rate[wo], (w, wo, rate)
    assert min(observed[w] for w in with_evidence) > max(observed[w] for w in without), observed
    # Retraining learns the listeners' taste, which the history-trained head does not know: a candidate is
    # promoted, ranks the songs that arrive after it better than the initial head, and lifts the like rate.
    retrain = result.outcomes["prior+evidence+retrain"]
    assert retrain.retrains == 5 and retrain.promotions >= 1, retrain
    late_new, late_old = retrain.late_prior_spearman, result.outcomes["prior+evidence"].late_prior_spearman
    assert late_new is not None and late_old is not None and late_new > late_old, (late_new, late_old)
    assert rate["prior+evidence+retrain"] > rate["prior+evidence"], rate
    assert observed["prior+evidence+retrain"] > observed["prior+evidence"], observed


def test_the_audience_like_rate_averages_the_listeners_style_boost() -> None:
    songs = [_Song("a", "lofi", "g", 0, 0.1, Path("a.wav")), _Song("b", "rock", "g", 0, 0.1, Path("b.wav"))]
    world = _World(songs, ["lofi", "lofi", "lofi", "jazz"], datetime(2026, 1, 1, tzinfo=UTC))
    rates = audience_like_rates(world, LoopConfig(style_boost=1.0))
    boosted = 1 / (1 + math.exp(-(math.log(0.1 / 0.9) + 1.0)))
    assert rates["a"] == pytest.approx(0.75 * boosted + 0.25 * 0.1)  # three of four listeners share its style
    assert rates["b"] == pytest.approx(0.1)  # nobody does


def test_loop_config_overrides_parse() -> None:
    cfg = loop_config(["history_songs=60", "retrain_lr=0.001", "audience_weights=consonance:0.2,clean:1.5"])
    assert cfg.history_songs == 60 and cfg.retrain_lr == 0.001 and cfg.retrain_batch_size is None
    assert cfg.audience_weights == (("consonance", 0.2), ("clean", 1.5))
    other = loop_config(["retrain_targets=counts", "half_life_hours=72", "audience_weights=history"])
    assert other.retrain_targets == "counts" and other.half_life_hours == 72.0 and other.audience_weights is None
    assert LoopConfig().audience_weights == LISTENER_WEIGHTS and LoopConfig().half_life_hours == 2.0
    assert loop_config(["retrain_likes_model=head"]).retrain_likes_model == "head"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("retrain_likes_model=forest", "retrain_likes_model"),
        ("retrain_holdout_fraction=1", "retrain_holdout_fraction"),
        ("retrain_targets=likes", "retrain_targets"),
        ("half_life_hours=0", "half_life_hours"),
        ("history=60", "KEY one of"),
        ("retrain_epochs=many", "retrain_epochs"),
        ("page_size=0", "page_size out of range"),
        ("audience_weights=loudness:1", "unknown audience_weights"),
    ],
)
def test_loop_config_refuses_bad_overrides_with_the_reason(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        loop_config([override])
