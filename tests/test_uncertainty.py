"""Issue 17, the model side: deep ensembles, the OOD score, old single-head models, the generator holdout.

Tiny shapes throughout: 2 layers x 6 features, heads of (16, 8) and (8, 4), a few dozen songs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from consumers.model_cli import cmd_eval, register
from ranker.events import AESTHETIC_TASKS, TASKS
from ranker.features import FeatureSet
from ranker.model.artifact import ScoringModel
from ranker.model.artifact_files import ModelArtifactError
from ranker.model.holdout import calibration_error, evaluate_holdout
from ranker.model.ood import fit_ood
from ranker.model.train import train_head
from ranker.model.train_config import TrainConfig
from ranker.scoring import SongMeta, score_predictions
from ranker.settings import Settings

GOLDEN = Path(__file__).parent / "golden" / "old_single_head"
N_LAYERS, DIM = 2, 6
TINY = {"epochs": 4, "batch_size": 16, "lr": 3e-3, "device": "cpu", "threads": 1, "shared_depth": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_world(tmp_path: Path, n: int = 60, seed: int = 0) -> tuple[FeatureSet, Path]:
    """Features with signal and a catalog: generators g-a and g-b, plus g-far whose features lie far away."""
    rng = np.random.default_rng(seed)
    gens = np.array(["g-a", "g-b", "g-far"])[rng.integers(0, 3, n)]
    x = rng.normal(size=(n, N_LAYERS, DIM)).astype(np.float32)
    x[gens == "g-far"] += 4.0
    quality = x[:, 0, 0] + 0.5 * x[:, 1, 1]
    ids = [f"s{i:04d}" for i in range(n)]
    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    streams = rng.poisson(np.exp(3 + 0.5 * quality.clip(-3, 3)))
    cols = {
        "song_id": ids,
        "audio_uri": [f"file:///nowhere/{s}.wav" for s in ids],
        "generator": gens.tolist(),
        "created_at": [t0 + timedelta(hours=i) for i in range(n)],
        "streams": streams,
        "likes": rng.binomial(streams, 1 / (1 + np.exp(-quality.clip(-3, 3) / 2))),
    }
    for j, t in enumerate(AESTHETIC_TASKS):
        cols[t] = np.clip(3 + quality + 0.3 * j * rng.normal(size=n), 1, 5)
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.table(cols), path)
    feats = FeatureSet(song_ids=ids, layers=x, n_segments=np.ones(n, np.int64), encoder_id="tiny-v1")
    return feats, path


def config(**kw: object) -> TrainConfig:
    return TrainConfig.model_validate({**TINY, **kw})


@pytest.fixture
def world(tmp_path: Path) -> tuple[FeatureSet, Path]:
    return tiny_world(tmp_path)


# -- ensembles ----------------------------------------------------------------------------


def test_an_ensemble_round_trips_with_its_spread_and_distinct_members(
    world: tuple[FeatureSet, Path], tmp_path: Path
) -> None:
    feats, cat = world
    result = train_head(feats, cat, config(ensemble=3))
    model = result.model
    assert model.ensemble_size == 3 and model.card.ensemble == 3
    assert model.card.training is not None and model.card.training["ensemble_seeds"] == [42, 43, 44]
    states = [h.state_dict() for h in model.heads]
    for a, b in ((0, 1), (1, 2), (0, 2)):  # different seeds: different weights in every layer
        assert all(not torch.equal(states[a][k], states[b][k]) for k in states[a] if k.endswith("weight"))
    loaded = ScoringModel.load(model.save(tmp_path / "ens"))
    assert loaded.version == model.version and loaded.ensemble_size == 3
    x = feats.layers[:7]
    full = loaded.predict_full(x)
    assert full.spread is not None and full.members is not None
    assert full.members.shape == (3, 7, len(TASKS))
    assert (full.spread > 0).all()
    np.testing.assert_array_equal(full.mean, loaded.predict(x))
    np.testing.assert_allclose(full.mean, full.members.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(full.spread, full.members.std(axis=0), rtol=1e-5)
    part = full.take([4, 1])
    assert part.members is not None and part.spread is not None and part.ood_percentile is not None
    np.testing.assert_array_equal(part.members, full.members[:, [4, 1]])
    np.testing.assert_array_equal(part.spread, full.spread[[4, 1]])
    np.testing.assert_array_equal(part.ood_percentile, full.ood_percentile[[4, 1]])
    songs = [SongMeta(s, "g-a", "2026-01-06T00:00:00+00:00") for s in feats.song_ids[:7]]
    scored = score_predictions(Settings(), loaded, full, songs)
    assert all(s.like_rate_sd is not None and s.like_rate_sd > 0 for s in scored)
    assert all(s.spread is not None and set(s.spread) == set(TASKS) for s in scored)


def test_an_ensemble_with_a_member_beyond_its_size_is_refused(world: tuple[FeatureSet, Path], tmp_path: Path) -> None:
    """The weights and the config must agree on the ensemble's size: a fourth member's tensors in a
    three-member model are a corrupted or mixed-up artifact, not something to ignore."""
    from safetensors.torch import load_file, save_file

    feats, cat = world
    saved = train_head(feats, cat, config(ensemble=3)).model.save(tmp_path / "ens")
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    tensors.update(
        {k.replace("member0.", "member3.", 1): v.clone() for k, v in tensors.items() if k.startswith("member0.")}
    )
    save_file(tensors, weights)
    with pytest.raises(ModelArtifactError, match=r"unexpected tensors \['member3\."):
        ScoringModel.load(saved)


def test_a_single_head_has_no_spread(world: tuple[FeatureSet, Path]) -> None:
    feats, cat = world
    model = train_head(feats, cat, config(ood=False)).model
    assert model.ensemble_size == 1 and "ensemble" not in json.loads(model.card.hashed_json())
    full = model.predict_full(feats.layers[:5])
    assert full.spread is None and full.members is None and full.ood_percentile is None
    scored = score_predictions(
        Settings(), model, full, [SongMeta(s, "g-a", "2026-01-06T00:00:00+00:00") for s in feats.song_ids[:5]]
    )
    assert all(s.spread is None and s.like_rate_sd is None and s.ood is None for s in scored)
    assert all(s.event(datetime.now(UTC)).schema_version == 1 for s in scored)


def test_a_single_head_saved_before_ensembles_loads_and_scores_bit_identically() -> None:
    """tests/golden/old_single_head: saved by commit 09b37ad (make_old_model.py), outputs recorded by it."""
    expected = json.loads((GOLDEN / "outputs.json").read_text())
    model = ScoringModel.load(GOLDEN / "model")
    assert model.version == expected["version"]
    x = np.load(GOLDEN / "features.npy")
    pred = model.predict(x)
    assert pred.tobytes() == np.asarray(expected["predict"], dtype=np.float32).tobytes()
    assert model.predict_full(x).mean.tobytes() == pred.tobytes()
    songs = [SongMeta(f"g{i}", "suno-v5", "2026-01-05T00:00:00+00:00") for i in range(len(x))]
    scored = score_predictions(Settings(), model, model.predict_full(x), songs)
    for got, want in zip(scored, expected["scores"], strict=True):
        assert got.scores == want["scores"]
        assert got.rank_score == want["rank_score"] and got.like_rate == want["like_rate"]
        assert got.uncertainty() == {}


# -- OOD ----------------------------------------------------------------------------------


def test_the_ood_percentile_is_monotone_in_distance_and_flags_a_far_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    wide = 60  # 120 inputs against 63 components: the residual term has directions of its own
    x = rng.normal(size=(80, N_LAYERS, wide)) * np.linspace(0.5, 2.0, wide)
    ood = fit_ood(x, seed=0)
    d = np.linspace(0.0, 3.0 * float(ood.calibration.max()), 50)
    pct = ood.percentile(d)
    assert (np.diff(pct) >= 0).all() and pct[0] == 0.0 and pct[-1] == 100.0
    near = x[:1] * 0.1
    far = near + 25.0
    assert ood.distance(far)[0] > ood.distance(near)[0]
    assert ood.score(far)[0] == 100.0 and ood.score(near)[0] < 95.0
    # Far along a direction the training songs never vary in (off the PCA subspace) counts too.
    off = np.zeros(N_LAYERS * wide)
    off[-1] = 1.0
    off -= ood.basis @ (ood.basis.T @ off)  # the part no kept component sees
    ortho = (x[:1].reshape(-1) + 30.0 * off / np.linalg.norm(off)).reshape(1, N_LAYERS, wide)
    assert ood.score(ortho)[0] == 100.0


def test_a_trained_model_carries_its_ood_model_and_flags_far_songs(
    world: tuple[FeatureSet, Path], tmp_path: Path
) -> None:
    feats, cat = world
    model = train_head(feats, cat, config()).model
    assert model.ood is not None and model.card.ood is not None
    loaded = ScoringModel.load(model.save(tmp_path / "m"))
    assert loaded.version == model.version and loaded.ood is not None
    far = feats.layers[:3] + 50.0
    songs = [SongMeta(s, "g-a", "2026-01-06T00:00:00+00:00") for s in ("x1", "x2", "x3")]
    scored = score_predictions(Settings(), loaded, loaded.predict_full(far), songs)
    assert all(s.ood is True and s.ood_percentile == 100.0 for s in scored)


# -- evaluation -------------------------------------------------------------------------


def test_calibration_error_is_zero_for_calibrated_and_positive_for_shifted_predictions() -> None:
    y = np.linspace(0, 10, 100)
    assert calibration_error(y, y) == 0.0
    assert calibration_error(y, y + 2.0) == pytest.approx(2.0)


def test_the_generator_holdout_reports_every_figure(world: tuple[FeatureSet, Path], tmp_path: Path) -> None:
    feats, cat = world
    _, report = evaluate_holdout(feats, cat, "g-far", config(ensemble=2))
    assert report["holdout_generator"] == "g-far" and report["ensemble"] == 2
    assert set(report["holdout"]) == set(TASKS)
    for m in report["holdout"].values():
        assert {"spearman", "calibration_error", "spread_error_spearman"} <= set(m)
        assert m["calibration_error"] is not None and m["calibration_error"] >= 0
    assert report["ood_auc"] is not None and report["ood_auc"] > 0.9  # g-far lies 4 sd away
    in_dist = report["in_distribution"]
    assert set(in_dist) == set(TASKS) and report["n_in_distribution"] > 0


def test_eval_needs_a_model_or_a_holdout_generator(
    world: tuple[FeatureSet, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--features", "nowhere", "--catalog", str(world[1])])
    assert args.fn is cmd_eval and cmd_eval(args) == 2
    assert "needs --model" in capsys.readouterr().err
    two = ["--holdout-generator", "a", "--holdout-generator", "b"]
    args = parser.parse_args(["eval", "--features", "nowhere", "--catalog", str(world[1]), *two])
    assert cmd_eval(args) == 2
    assert "takes one generator" in capsys.readouterr().err


def test_the_novel_generator_renders_consonance_inverted_and_leaves_default_worlds_alone() -> None:
    from ranker.synth import DEFAULT_GENERATORS, NOVEL_GENERATOR, compose_song, render_composition, synthesize_song
    from ranker.synth.cast import rendered_qualities

    q = np.array([0.75, 0.5, 0.4, 0.2, 0.7])
    np.testing.assert_array_equal(rendered_qualities(NOVEL_GENERATOR, q), [0.25, 0.5, 0.4, 0.2, 0.7])
    assert all(not g.inverted for g in DEFAULT_GENERATORS)
    np.testing.assert_array_equal(rendered_qualities(DEFAULT_GENERATORS[0], q), q)
    song = synthesize_song(5, q, "pop", 1.0, 8000, generator=NOVEL_GENERATOR)
    twin = render_composition(compose_song(5, [0.25, 0.5, 0.4, 0.2, 0.7], "pop", 1.0), 8000, lowpass_hz=8_000.0)
    np.testing.assert_array_equal(song, twin.astype(np.float32))


def test_a_catalog_renders_the_novel_generator_as_synthesize_song_does(tmp_path: Path) -> None:
    import soundfile as sf

    from ranker.synth import NOVEL_GENERATOR, QUALITY_NAMES, simulate_catalog, synthesize_song

    result = simulate_catalog(
        tmp_path, n_songs=2, seed=3, duration_s=0.5, sample_rate=8000, generators=[NOVEL_GENERATOR]
    )
    table = result.table.to_pylist()
    for row in table:
        q = [row[f"latent_{name}"] for name in QUALITY_NAMES]
        want = synthesize_song(row["latent_audio_seed"], q, row["style"], 0.5, 8000, generator=NOVEL_GENERATOR)
        got, _ = sf.read(tmp_path / "audio" / f"{row['song_id']}.wav", dtype="float32")
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_a_retrain_of_an_ensemble_stays_an_ensemble(tmp_path: Path) -> None:
    from ranker.model.head import ApexHead, HeadConfig
    from ranker.model.retrain import retrain
    from ranker.model.targets import TargetTransform
    from tests.test_retrain import _observed, _placement_world

    features, _, plays, likes = _placement_world(120, seed=4)
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        heads.append(ApexHead(HeadConfig(input_dim=16, n_layers=4)))  # the shape TrainConfig builds
    transform = TargetTransform.fit({"streams": plays, "likes": likes}).to_dict()
    current = ScoringModel.from_head(heads, encoder_id="test-enc", training={"note": "t"}, target_transform=transform)
    report = retrain(
        current,
        features,
        _observed(features, plays, likes),
        models_root=tmp_path,
        holdout_fraction=0.2,
        margin=0.0,  # the seeded ensemble knows nothing: the candidate gains
        warm_start=True,
        train_config=TrainConfig(epochs=2, lr=1e-3, batch_size=32, seed=0, threads=1),
        likes_model="head",
        min_songs_head=0,
    )
    assert report.promoted and report.model_dir is not None, report
    assert ScoringModel.load(report.model_dir).ensemble_size == 2
