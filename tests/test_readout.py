"""The like-rate read-out: what it learns from few songs, how a model carries it, what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from ranker.model.artifact import ModelArtifactError, ScoringModel
from ranker.model.readout import DEFAULT_L2_GRID, LikeReadout, ReadoutError, fit_like_readout
from ranker.model.targets import TargetTransform


def _songs(n: int, seed: int, dim: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, true like rates (one direction of the features), plays (another direction) and likes."""
    shape = np.random.default_rng(0)  # every call: the same feature scales and offsets (unstandardised)
    scale, offset = shape.uniform(0.5, 3.0, size=dim), shape.normal(size=dim)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, dim))
    x = z * scale + offset
    rate = 1 / (1 + np.exp(-(-1.6 + 0.8 * z[:, 0])))
    plays = rng.poisson(np.exp(2.0 + 0.8 * rng.normal(size=n))) + 1
    return x, rate, plays, rng.binomial(plays, rate)


def test_a_readout_learns_the_like_rate_from_a_few_dozen_songs() -> None:
    x, _, plays, likes = _songs(60, seed=1)
    readout = fit_like_readout(x, plays, likes, gamma=0.7)
    fresh, true_rate, _, _ = _songs(2000, seed=2)
    assert float(spearmanr(readout.logits(fresh), true_rate).statistic) > 0.6
    # Its rates are like rates at the level of the songs it saw (the pooled rate), not at 0.5.
    assert float(np.mean(readout.rates(x))) == pytest.approx(likes.sum() / plays.sum(), rel=0.2)
    assert readout.l2 in DEFAULT_L2_GRID
    assert readout.n_songs == 60 and readout.n_plays == int(plays.sum())


def test_scores_keep_their_meaning_and_the_curve_inverts_them() -> None:
    x, _, plays, likes = _songs(80, seed=3)
    readout = fit_like_readout(x, plays, likes, gamma=0.7)
    logits, scores = readout.logits(x), readout.scores(x)
    assert scores.min() >= 0.0 and scores.max() <= 100.0
    order = np.argsort(logits)
    assert np.all(np.diff(scores[order]) >= -1e-9)  # a higher like rate, a higher likes score
    curve = readout.rate_curve()
    back = np.interp(scores, curve["x"], curve["y"])
    np.testing.assert_allclose(back, readout.rates(x), atol=0.01)  # the curve maps a score to its rate
    assert LikeReadout.from_dict(json.loads(json.dumps(readout.to_dict()))).to_dict() == readout.to_dict()


def test_a_readout_with_no_signal_stays_at_the_pooled_rate() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 24))
    plays = rng.integers(5, 30, size=100)
    likes = rng.binomial(plays, 0.15)  # the features say nothing
    readout = fit_like_readout(x, plays, likes)
    rates = readout.rates(rng.normal(size=(500, 24)))
    assert float(np.std(rates)) < 0.02
    assert float(np.mean(rates)) == pytest.approx(likes.sum() / plays.sum(), abs=0.02)


@pytest.mark.parametrize(
    ("plays", "likes", "match"),
    [
        ([5, 5, 5, 5, 5], [6, 0, 0, 0, 0], "likes <= plays"),
        ([5, -1, 5, 5, 5], [0, 0, 0, 0, 0], "likes <= plays"),
        ([5, 5, 5], [1, 1, 1], "at least 4 songs"),
        ([0, 0, 0, 0, 0], [0, 0, 0, 0, 0], "at least 4 songs"),
        ([5, 5, 5, 5, np.nan], [1, 1, 1, 1, 1], "finite"),
    ],
)
def test_bad_counts_are_refused_with_the_reason(plays: list[float], likes: list[float], match: str) -> None:
    x = np.random.default_rng(0).normal(size=(len(plays), 4))
    with pytest.raises(ReadoutError, match=match):
        fit_like_readout(x, np.array(plays, dtype=float), np.array(likes, dtype=float))


def test_a_model_carries_its_readout_through_save_and_load(tmp_path: Path) -> None:
    x, _, plays, likes = _songs(60, seed=4, dim=2 * 12)
    layers = x.reshape(60, 2, 12).astype(np.float32)
    base = ScoringModel.from_seed(12, seed=0, encoder_id="test-enc", n_layers=2, layers=(5, 12))
    transform = TargetTransform.fit({"streams": plays, "likes": likes}).to_dict()
    readout = fit_like_readout(layers.reshape(60, -1), plays, likes, gamma=TargetTransform.from_dict(transform).gamma)
    model = base.with_target_transform(transform).with_like_readout(readout, training={"likes_model": "readout"})
    assert model.version != base.version and model.like_readout is not None
    li, si = model.tasks.index("likes"), model.tasks.index("streams")
    with_head, with_readout = base.predict(layers), model.predict(layers)
    np.testing.assert_allclose(with_readout[:, li], readout.scores(layers.reshape(60, -1)), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(with_readout[:, si], with_head[:, si])  # the other outputs are the head's
    loaded = ScoringModel.load(model.save(tmp_path / "m"))
    assert loaded.version == model.version
    np.testing.assert_allclose(loaded.predict(layers), with_readout, rtol=1e-6)
    # A card from before the read-out existed keeps its version (the empty field is not hashed): the
    # version this seeded model had at commit b0ccfbb, before the field.
    assert base.version == "untrained-seed0-c21653ed3749"
    assert ScoringModel.load(base.save(tmp_path / "b")).version == base.version


def test_a_readout_that_does_not_fit_the_head_is_refused_on_load(tmp_path: Path) -> None:
    x, _, plays, likes = _songs(40, seed=6, dim=24)
    model = ScoringModel.from_seed(12, seed=0, encoder_id="test-enc", n_layers=2, layers=(5, 12))
    with_readout = model.with_like_readout(fit_like_readout(x, plays, likes))
    directory = with_readout.save(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["like_readout"]["coef"] = config["like_readout"]["coef"][:-1]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelArtifactError, match=r"like_readout|read-out"):
        ScoringModel.load(directory)
    narrow = ScoringModel.from_seed(8, seed=0, encoder_id="test-enc", n_layers=2, layers=(5, 12))
    with pytest.raises(ValueError, match="read-out takes 24 features"):
        narrow.with_like_readout(fit_like_readout(x, plays, likes))


def test_the_penalty_is_not_scaled_up_past_the_cross_validated_songs() -> None:
    # 4,000 songs, cross-validation on 400 of them: the fit keeps the spread of the rates that a
    # cross-validation on all of them gives (scaling the penalty with the songs flattened it).
    x, true_rate, plays, likes = _songs(4000, seed=7)
    sub = fit_like_readout(x, plays, likes, max_cv_songs=400)
    full = fit_like_readout(x, plays, likes, max_cv_songs=4000)
    spread_sub, spread_full = float(np.std(sub.rates(x))), float(np.std(full.rates(x)))
    assert spread_sub > 0.6 * spread_full and spread_sub > 0.5 * float(np.std(true_rate)), (spread_sub, spread_full)


def test_no_like_at_all_keeps_the_intercept_finite() -> None:
    x, _, plays, _ = _songs(50, seed=8)
    readout = fit_like_readout(x, plays, np.zeros_like(plays))
    rates = readout.rates(x)
    assert np.all(np.isfinite(readout.quantiles)) and readout.intercept > -12
    assert float(np.max(rates)) < 0.05  # low, as the counts say, but not 1e-12


def test_scoring_far_from_zero_features_is_precise() -> None:
    # Features with a mean 30x their spread: centring before the product keeps the logits exact.
    x, _, plays, likes = _songs(200, seed=9)
    shifted = x + 30.0 * np.abs(x).max()
    a, b = fit_like_readout(x, plays, likes), fit_like_readout(shifted, plays, likes)
    assert a.l2 == b.l2
    np.testing.assert_allclose(b.logits(shifted), a.logits(x), atol=0.02)
