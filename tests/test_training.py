"""Feature caching, training, evaluation, the ablation and the released-checkpoint import.

The acceptance test trains on a seeded synthetic catalogue of 2,000 songs (1.5 s each, logmel
features) and checks that the head beats the same head trained on shuffled targets on held-out
songs by a wide margin. Everything else runs on a 60-song catalogue of 3 s songs cut into 1 s
segments, so that the segment input mode has several segments per song.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from ranker import synth
from ranker.catalog import CatalogError, read_catalog
from ranker.embed import embed_catalog
from ranker.encoders.base import pool_song
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, TASKS
from ranker.features import (
    FeatureSet,
    FeatureStoreError,
    load_features,
)
from ranker.model.ablation import all_conditions, paper_conditions, run_ablation
from ranker.model.artifact import ScoringModel
from ranker.model.battles import BattleError, cross_validated_logistic, evaluate_battles, read_battles, roc_auc
from ranker.model.evaluate import evaluate, evaluate_report, regression_metrics
from ranker.model.registry import load_or_init
from ranker.model.released import (
    ReleasedCheckpointError,
    load_released,
    mert_encoder_id,
    paper_layer_mix,
)
from ranker.model.report import write_json
from ranker.model.train import train_head
from ranker.model.train_config import TrainConfig
from ranker.settings import AudioSettings, ModelSettings, Settings

N_MELS = 32
SMALL_SONGS = 60
FAST = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "device": "cpu"}


def _settings(n_mels: int = N_MELS, segment_s: float = 1.0) -> Settings:
    return Settings(
        encoder="logmel",
        model=ModelSettings(logmel_n_mels=n_mels),
        audio=AudioSettings(segment_s=segment_s),
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny batches run fastest on one thread, and on a busy 2-core machine a second one can
    make each step 20-50x slower (OpenMP barriers spin while the other core is taken)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_rng_leaks() -> Iterator[None]:
    state = torch.random.get_rng_state()
    yield
    assert torch.equal(state, torch.random.get_rng_state()), "the test changed the global torch RNG"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """60 synthetic songs of 3 s, embedded with 1 s segments (3 segments a song)."""
    root = tmp_path_factory.mktemp("small")
    cat = synth.simulate_catalog(root / "catalog", n_songs=SMALL_SONGS, seed=5, duration_s=3.0)
    report = embed_catalog(cat.catalog_path, root / "features", _settings(), progress=False)
    assert report.embedded == SMALL_SONGS and report.failed == 0
    return {"root": root, "catalog": cat.catalog_path, "features": root / "features", "audio": cat.audio_dir}


def _write_variant(src: Path, dst: Path, **columns: list[Any]) -> Path:
    table = pq.read_table(src)
    for name, values in columns.items():
        idx = table.column_names.index(name)
        table = table.set_column(idx, name, pa.array(values, type=table.schema.field(name).type))
    pq.write_table(table, dst)
    return dst


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------


def test_embed_skips_and_reports_unreadable_songs(small: dict[str, Any], tmp_path: Path) -> None:
    table = pq.read_table(small["catalog"])
    uris = table.column("audio_uri").to_pylist()
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    uris[3] = (tmp_path / "missing.wav").as_uri()
    uris[7] = garbage.as_uri()
    bad = _write_variant(small["catalog"], tmp_path / "bad.parquet", audio_uri=uris)
    ids = table.column("song_id").to_pylist()

    report = embed_catalog(bad, tmp_path / "features", _settings(), progress=False, batch_songs=8)
    assert report.embedded == SMALL_SONGS - 2 and report.skipped_existing == 0
    assert [(f.song_id, f.row, f.code) for f in report.failures] == [
        (ids[3], 3, "file_not_found"),
        (ids[7], 7, "undecodable_audio"),
    ]
    assert "2 failed" in report.summary() and "file_not_found: 1" in report.summary()

    features = load_features(tmp_path / "features")
    assert len(features) == SMALL_SONGS - 2
    assert features.failed == {ids[3]: "file_not_found", ids[7]: "undecodable_audio"}
    # Training knows those two were failures, not songs missing from the features.
    result = train_head(features, bad, TrainConfig(**FAST))
    assert sorted(result.skipped_failed) == sorted([ids[3], ids[7]])


def test_embed_resumes_where_it_stopped(small: dict[str, Any], tmp_path: Path) -> None:
    table = pq.read_table(small["catalog"])
    first = tmp_path / "first.parquet"
    pq.write_table(table.slice(0, 25), first)
    out = tmp_path / "features"
    a = embed_catalog(first, out, _settings(), progress=False)
    assert (a.embedded, a.skipped_existing) == (25, 0)
    b = embed_catalog(small["catalog"], out, _settings(), progress=False)
    assert (b.embedded, b.skipped_existing) == (SMALL_SONGS - 25, 25)
    c = embed_catalog(small["catalog"], out, _settings(), progress=False)
    assert (c.embedded, c.skipped_existing, c.failed) == (0, SMALL_SONGS, 0)
    # A resumed directory holds exactly what one uninterrupted run gives.
    resumed, whole = load_features(out), load_features(small["features"])
    assert resumed.song_ids == whole.song_ids
    np.testing.assert_allclose(resumed.layers, whole.layers, rtol=1e-6, atol=1e-6)


def test_a_different_encoder_is_refused(small: dict[str, Any]) -> None:
    with pytest.raises(FeatureStoreError, match="encoder_id"):
        embed_catalog(small["catalog"], small["features"], _settings(n_mels=16), progress=False)
    with pytest.raises(FeatureStoreError, match="segment_s"):
        embed_catalog(small["catalog"], small["features"], _settings(segment_s=2.0), progress=False)


def test_stored_features_are_consistent(small: dict[str, Any]) -> None:
    features = load_features(small["features"])
    assert features.layers.shape == (SMALL_SONGS, 4, N_MELS)
    assert (features.n_segments == 3).all()
    seg = features.segments()
    assert len(seg) == 3 * SMALL_SONGS
    for i in (0, 17, SMALL_SONGS - 1):
        rows = seg.song_index == i
        np.testing.assert_allclose(
            pool_song(seg.features[rows], seg.frames[rows]), features.layers[i], rtol=1e-5, atol=1e-5
        )
    some = [features.song_ids[5], features.song_ids[2]]
    picked = load_features(small["features"], some)
    assert picked.song_ids == some
    np.testing.assert_array_equal(picked.layers[0], features.layers[5])
    sub = features.subset([5, 2])
    np.testing.assert_array_equal(sub.segments().features, picked.segments().features)
    with pytest.raises(FeatureStoreError, match="no-such-song"):
        load_features(small["features"], ["no-such-song"])
    with pytest.raises(FeatureStoreError, match="apexrank embed"):
        load_features(small["root"] / "nowhere")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def test_training_is_deterministic_and_the_model_dir_round_trips(small: dict[str, Any], tmp_path: Path) -> None:
    features = load_features(small["features"])
    config = TrainConfig(**FAST)
    a = train_head(features, small["catalog"], config)
    b = train_head(features, small["catalog"], config)
    assert a.model.version == b.model.version  # same seed, same data: same weights
    assert a.epochs_run == 3 and len(a.history) == 3 and a.train_song_ids and a.val_song_ids
    assert not set(a.train_song_ids) & set(a.val_song_ids)
    assert set(a.metrics) == set(TASKS) and all(
        set(m) == {"pearson", "spearman", "mae", "mse"} for m in a.metrics.values()
    )

    card = a.model.card
    assert card.target_transform is not None and card.training is not None
    assert card.training["config"]["loss"] == "uncertainty" and card.training["n_train"] == len(a.train_song_ids)
    # The transform was fitted on the training split only.
    assert card.target_transform["tables"]["streams"]["all"]["n"] == len(a.train_song_ids)

    a.model.save(tmp_path / "models" / a.model.version)
    (tmp_path / "models" / "current").symlink_to(a.model.version)
    loaded = load_or_init(
        tmp_path / "models",
        input_dim=N_MELS,
        encoder_id=features.encoder_id,
        seed=0,
        n_layers=4,
        layers=None,
    )
    assert loaded.version == a.model.version and loaded.trained
    np.testing.assert_array_equal(loaded.predict(features.layers), a.model.predict(features.layers))
    assert loaded.metrics is not None and "validation" in loaded.metrics


def test_input_standardisation_makes_training_blind_to_feature_scale(small: dict[str, Any]) -> None:
    import dataclasses

    features = load_features(small["features"])
    # A power-of-two scale is exact in float32, so standardised inputs are bit for bit the same.
    rescaled = dataclasses.replace(features, layers=(features.layers * 256.0).astype(np.float32))
    a = train_head(features, small["catalog"], TrainConfig(**FAST)).model
    b = train_head(rescaled, small["catalog"], TrainConfig(**FAST)).model
    assert a.head.config.input_norm and b.head.config.input_norm
    # The statistics travel with the weights: the same songs score the same at either scale.
    np.testing.assert_allclose(a.predict(features.layers), b.predict(rescaled.layers), rtol=1e-5, atol=1e-4)
    stats = b.head.state_dict()
    torch.testing.assert_close(stats["in_std"], a.head.state_dict()["in_std"] * 256.0)
    # Off, the paper's head sees the raw scale and learns something else.
    c = train_head(rescaled, small["catalog"], TrainConfig(**FAST, standardize=False)).model
    assert not c.head.config.input_norm and "in_mean" not in c.head.state_dict()
    assert not np.allclose(c.predict(rescaled.layers), b.predict(rescaled.layers), atol=1e-2)
    # A warm start keeps the starting head's choice (and its statistics), whatever the config says.
    warm = train_head(rescaled, small["catalog"], TrainConfig(**FAST, standardize=False), init=b).model
    assert warm.head.config.input_norm
    assert torch.equal(warm.head.state_dict()["in_mean"], stats["in_mean"])


def test_early_stopping_restores_the_best_weights(small: dict[str, Any]) -> None:
    from ranker.model.evaluate import align, target_matrix
    from ranker.model.targets import TargetTransform

    features = load_features(small["features"])
    config = TrainConfig(epochs=40, patience=3, batch_size=16, lr=3e-2, device="cpu")
    result = train_head(features, small["catalog"], config)
    losses = [h["val_loss"] for h in result.history]
    assert result.stopped_early and result.epochs_run < 40
    assert result.epochs_run == result.best_epoch + 3
    assert result.best_epoch == 1 + int(np.argmin(losses))
    # The returned weights are the best epoch's: they reproduce its validation loss.
    cat = read_catalog(small["catalog"])
    al = align(features, cat, result.val_song_ids)
    assert result.model.target_transform is not None
    transform = TargetTransform.from_dict(result.model.target_transform)
    truth = torch.from_numpy(target_matrix(cat, al.catalog_rows, list(TASKS), transform))
    pred = torch.from_numpy(result.model.predict(features.layers[al.feature_rows]))
    assert float(result.model.head.loss(pred, truth)) == pytest.approx(min(losses), rel=1e-4, abs=1e-4)


def test_other_options_train(small: dict[str, Any]) -> None:
    features = load_features(small["features"])
    gens = sorted(set(read_catalog(small["catalog"]).column("generator").tolist()))
    seg = train_head(
        features,
        small["catalog"],
        TrainConfig(**FAST, input_mode="segment", tasks="popularity", loss="weighted", shared_depth=3),
    )
    assert seg.model.tasks == POPULARITY_TASKS and seg.rows_per_epoch == 3 * len(seg.train_song_ids)
    assert seg.model.card.training is not None and seg.model.card.training["input_mode"] == "segment"
    held = train_head(
        features, small["catalog"], TrainConfig(**FAST, holdout_generators=(gens[0],), layer_mix="conv1x1")
    )
    cat = read_catalog(small["catalog"])
    gen_of = dict(zip(cat.song_ids, cat.column("generator").tolist(), strict=True))
    assert {gen_of[s] for s in held.val_song_ids} == {gens[0]}
    assert gens[0] not in {gen_of[s] for s in held.train_song_ids}
    # The paper's fixed mix: conv1x1 starting at the seeded Conv1d and never trained.
    fixed = train_head(features, small["catalog"], TrainConfig(**FAST, layer_mix="conv1x1", train_layer_mix=False))
    w, _ = paper_layer_mix()
    assert fixed.model.head.mix.conv is not None
    torch.testing.assert_close(fixed.model.head.mix.conv.weight, w)
    scaled = train_head(features, small["catalog"], TrainConfig(**FAST, stop_on="val_scaled_mse"))
    crit = [h["val_scaled_mse"] for h in scaled.history]
    assert scaled.best_epoch == 1 + int(np.argmin(crit))
    none = train_head(features, small["catalog"], TrainConfig(**FAST, val_fraction=0.0))
    assert none.val_song_ids == [] and none.metrics == {} and none.best_epoch == 3
    with pytest.raises(CatalogError, match="no-such-generator"):
        train_head(features, small["catalog"], TrainConfig(**FAST, holdout_generators=("no-such-generator",)))


def test_bad_catalog_input_gives_clear_errors(small: dict[str, Any], tmp_path: Path) -> None:
    features = load_features(small["features"])
    table = pq.read_table(small["catalog"])
    config = TrainConfig(**FAST)

    no_streams = tmp_path / "no_streams.parquet"
    pq.write_table(table.drop(["streams"]), no_streams)
    with pytest.raises(CatalogError, match=r"lacks the target column.*streams"):
        train_head(features, no_streams, config)

    no_aesthetics = tmp_path / "no_aesthetics.parquet"
    pq.write_table(table.drop(list(AESTHETIC_TASKS)), no_aesthetics)
    with pytest.raises(CatalogError, match="tasks=popularity"):
        train_head(features, no_aesthetics, config)
    assert train_head(features, no_aesthetics, TrainConfig(**FAST, tasks="popularity")).model.tasks == POPULARITY_TASKS

    ids = table.column("song_id").to_pylist()
    ids[4], ids[9] = "stranger-1", "stranger-2"
    strangers = _write_variant(small["catalog"], tmp_path / "strangers.parquet", song_id=ids)
    with pytest.raises(CatalogError, match=r"no features .* rows 4, 9"):
        train_head(features, strangers, config)
    with pytest.raises(CatalogError, match=r"rows 4, 9"):
        evaluate(train_head(features, small["catalog"], config).model, features, strangers)

    streams = table.column("streams").to_pylist()
    streams[2], streams[11] = -5, None
    negative = _write_variant(small["catalog"], tmp_path / "negative.parquet", streams=streams)
    with pytest.raises(CatalogError, match=r"NaN or missing counts at rows 11"):
        train_head(features, negative, config)
    streams[11] = 3
    negative = _write_variant(small["catalog"], tmp_path / "negative2.parquet", streams=streams)
    with pytest.raises(CatalogError, match=r"negative counts at rows 2"):
        train_head(features, negative, config)

    with pytest.raises(ValueError, match="extra"):
        TrainConfig(epochs=2, bogus=1)  # type: ignore[call-arg]


# --------------------------------------------------------------------------------------
# Evaluation and battles
# --------------------------------------------------------------------------------------


def test_metrics_and_roc_auc_are_right() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    p = t + rng.normal(size=200)
    m = regression_metrics(t, p)
    from scipy import stats

    assert m["pearson"] == pytest.approx(stats.pearsonr(t, p)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(t, p)[0])
    assert m["mse"] == pytest.approx(np.mean((p - t) ** 2)) and m["mae"] == pytest.approx(np.mean(np.abs(p - t)))
    assert math.isnan(regression_metrics([1, 1, 1], [1, 2, 3])["pearson"])

    y = rng.random(100) < 0.5
    s = rng.normal(size=100) + y
    s[:10] = 0.0  # ties
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert roc_auc(y, s) == pytest.approx(brute)

    x = rng.normal(size=(400, 3))
    yy = (x @ np.array([2.0, -1.0, 0.0]) + 0.5 * rng.normal(size=400)) > 0
    cv = cross_validated_logistic(x, yy, folds=10, seed=42)
    assert cv["auc"] > 0.9 and cv["accuracy"] > 0.8 and cv["folds"] == 10
    noise = cross_validated_logistic(rng.normal(size=(400, 3)), yy, folds=10, seed=42)
    assert 0.35 < noise["auc"] < 0.65


def _battle_rows(ids: list[str], better: np.ndarray, seed: int, n: int = 120) -> list[tuple[str, str, str]]:
    """``n`` random pairs; the song with the larger ``better`` wins, except 10% ties/both_bad (20% upper case)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        i, j = rng.choice(len(ids), 2, replace=False)
        pref = rng.choice(["tie", "both_bad"]) if rng.random() < 0.1 else ("a" if better[i] > better[j] else "b")
        rows.append((ids[i], ids[j], pref.upper() if rng.random() < 0.2 else pref))
    return rows


def _write_battles(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("song_a,song_b,preference\n" + "".join(f"{a},{b},{p}\n" for a, b, p in rows))
    return path


def test_battles(small: dict[str, Any], tmp_path: Path) -> None:
    """Battles whose winner is known: the one the model itself scores higher on popularity.

    The preferred side is computed here from ``model.predict`` on the stored features (mean of
    the streams and likes outputs), so every rule built on those outputs must call nearly every
    battle right; the same pairs with the decided preferences shuffled stay near chance.
    """
    features = load_features(small["features"])
    model = train_head(features, small["catalog"], TrainConfig(**FAST)).model
    ids = features.song_ids
    pred = model.predict(features.layers).astype(np.float64)
    popularity = pred[:, [model.tasks.index(t) for t in POPULARITY_TASKS]].mean(axis=1)
    rows = _battle_rows(ids, popularity, seed=1)
    decided = [p.lower() in ("a", "b") for *_, p in rows]
    report = evaluate_battles(model, features, _write_battles(tmp_path / "battles.csv", rows))
    assert report.n_battles == 120 and report.n_decided == sum(decided) > 100
    assert report.outcomes == {p: sum(r[2].lower() == p for r in rows) for p in ("a", "b", "tie", "both_bad")}
    assert min(report.outcomes["a"], report.outcomes["b"]) > 30  # both sides win often: no constant guess passes
    assert {"streams", "likes", "popularity_mean", "aesthetic_mean", "all_z_sum"} <= set(report.rules)
    assert set(report.logistic) == {"popularity", "popularity+aesthetics"}
    # The rule the preferences were made with is right on every battle.
    assert report.rules["popularity_mean"]["accuracy"] == 1.0 and report.rules["popularity_mean"]["auc"] == 1.0
    assert report.rules["popularity_mean"]["n"] == report.n_decided
    for name in ("streams", "likes"):  # each half of it, well above chance
        assert report.rules[name]["accuracy"] > 0.75 and report.rules[name]["auc"] > 0.85, (name, report.rules[name])
    for name, row in report.logistic.items():  # cross-validated fits on the score differences too
        assert row["accuracy"] > 0.8 and row["auc"] > 0.9, (name, row)

    # Control: the same pairs with the decided preferences shuffled (a and b swapped at random).
    rng = np.random.default_rng(2)
    flips = iter(rng.permutation([r[2] for r, d in zip(rows, decided, strict=True) if d]))
    shuffled = [(a, b, next(flips) if d else p) for (a, b, p), d in zip(rows, decided, strict=True)]
    control = evaluate_battles(model, features, _write_battles(tmp_path / "shuffled.csv", shuffled))
    assert control.n_decided == report.n_decided
    for name, row in control.rules.items():
        assert 0.35 < row["accuracy"] < 0.65 and 0.35 < row["auc"] < 0.65, (name, row)
    for name, row in control.logistic.items():  # out-of-fold fits on noise can land a little below chance
        assert 0.25 < row["accuracy"] < 0.75 and 0.25 < row["auc"] < 0.75, (name, row)

    out = write_json(tmp_path / "b.json", report.to_dict())
    assert json.loads(out.read_text())["n_decided"] == report.n_decided

    bad = tmp_path / "bad.csv"
    bad.write_text(f"song_a,song_b,preference\n{ids[0]},{ids[1]},a\n{ids[2]},{ids[3]},maybe\n")
    with pytest.raises(BattleError, match=r"rows 1 \(got e.g. 'maybe'\)"):
        read_battles(bad)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"song_a,song_b,preference\n{ids[0]},{ids[1]},a\n{ids[2]},nobody,b\n")
    with pytest.raises(BattleError, match="rows 1"):
        evaluate_battles(model, features, unknown)


def test_a_model_without_a_transform_is_evaluated_on_the_catalog_scale(small: dict[str, Any]) -> None:
    features = load_features(small["features"])
    untrained = ScoringModel.from_seed(N_MELS, 3, features.encoder_id, layers=None)
    report = evaluate_report(untrained, features, small["catalog"])
    assert set(report.metrics) == set(TASKS) and report.n_songs == SMALL_SONGS
    assert any("no target transform" in n for n in report.notes)
    other = ScoringModel.from_seed(16, 3, features.encoder_id, layers=None)
    with pytest.raises(FeatureStoreError, match="expects features"):
        evaluate(other, features, small["catalog"])


# --------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------


def test_ablation_runs_every_condition_and_writes_the_table(small: dict[str, Any], tmp_path: Path) -> None:
    features = load_features(small["features"])
    assert len(paper_conditions()) == 24 and len(all_conditions()) == 26
    assert len({(c.input_mode, c.tasks, c.loss, c.shared_depth) for c in paper_conditions()}) == 24
    result = run_ablation(
        features,
        small["catalog"],
        tmp_path / "ablation",
        base=TrainConfig(epochs=2, batch_size=16, lr=1e-3, device="cpu"),
        test_fraction=0.2,
        progress=False,
    )
    assert len(result.rows) == 26 and result.split["n_test"] == 12
    for row in result.rows:
        assert row["streams"] is not None and row["likes"] is not None
        assert (row["coherence"] is None) == (row["tasks"] == "popularity")
    md = result.paths["md"].read_text()
    for cond in all_conditions():
        assert cond.name in md
    assert "Padding-aware pooling" in md
    assert len(result.paths["csv"].read_text().strip().splitlines()) == 27
    data = json.loads(result.paths["json"].read_text())
    assert len(data["rows"]) == 26 and data["split"]["n_trainval"] == SMALL_SONGS - 12


# --------------------------------------------------------------------------------------
# The released checkpoint
# --------------------------------------------------------------------------------------
# A re-statement of the public code's modules (AMAAI-Lab/apex, train.py): the state-dict keys
# below come from these module names, which is what the importer has to map.


class _SharedBlock(nn.Module):
    def __init__(self, i: int, o: int, p: float) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.GELU(), nn.Dropout(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _TaskBranch(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.branch = nn.Sequential(_SharedBlock(256, 128, 0.1), _SharedBlock(128, 64, 0.1), nn.Linear(64, 1))
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.branch(x)) * self.scale + self.shift


class _PaperMLP(nn.Module):
    def __init__(self, task: str, n_shared: int) -> None:
        super().__init__()
        dims = [768, 512, 256] if n_shared == 2 else [768, 512, 384, 256]
        self.shared = nn.Sequential(*(_SharedBlock(a, b, 0.3) for a, b in itertools.pairwise(dims)))
        self.names = ["score_streams", "score_likes"] + (list(AESTHETIC_TASKS) if task == "full" else [])
        for name in self.names:
            scale, shift = (100.0, 0.0) if name.startswith("score_") else (4.0, 1.0)
            setattr(self, f"branch_{name}", _TaskBranch(scale, shift))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.shared(x)
        return {n: getattr(self, f"branch_{n}")(s).squeeze(1) for n in self.names}


def _paper_checkpoint(path: Path, task: str, n_shared: int) -> _PaperMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = _PaperMLP(task, n_shared)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(3):  # move weights and BatchNorm statistics away from their start
            opt.zero_grad()
            out = model(torch.randn(32, 768) * 2 + 0.5)
            sum(v.mean() for v in out.values()).backward()
            opt.step()
    model.eval()
    sigmas = {f"log_sigmas.{n}": torch.tensor([0.1 * k]) for k, n in enumerate(model.names)}
    torch.save(
        {
            "epoch": 7,
            "model_state": model.state_dict(),
            "optimizer_state": opt.state_dict(),
            "scheduler_state": {"last_epoch": 7, "T_max": 50},
            "val_loss": 12.5,
            "val_task_losses": {n: 1.0 for n in model.names},
            "train_loss": 11.0,
            "mode": "song",
            "task": task,
            "loss": "uncertainty",
            "shared": n_shared,
            "uncertainty_loss_state": sigmas,
            "final_sigmas": {n: 1.0 for n in model.names},
            "final_weights": {n: 1.0 for n in model.names},
        },
        path,
    )
    return model


@pytest.mark.parametrize(("task", "n_shared"), [("full", 2), ("popularity", 3)])
def test_released_checkpoint_imports_exactly(tmp_path: Path, task: str, n_shared: int) -> None:
    ckpt = tmp_path / "best_model.pt"
    paper = _paper_checkpoint(ckpt, task, n_shared)
    model = load_released(ckpt)
    assert model.head.config.layer_mix == "conv1x1" and model.head.config.shared_depth == n_shared
    assert model.tasks == (TASKS if task == "full" else POPULARITY_TASKS)
    assert model.encoder_id == mert_encoder_id() == "mert:m-a-p/MERT-v1-95M:layers=2,5,8,12"
    assert model.layers == (2, 5, 8, 12) and model.target_transform is None

    x = torch.randn(16, 4, 768, generator=torch.Generator().manual_seed(3))
    # The public code's layer mix: a Conv1d(4, 1, 1) built right after manual_seed(42).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        aggregator = nn.Conv1d(4, 1, kernel_size=1)
    with torch.no_grad():
        theirs = paper(aggregator(x).squeeze(1))
    ours = model.predict(x.numpy())
    for j, t in enumerate(model.tasks):
        key = f"score_{t}" if t in POPULARITY_TASKS else t
        np.testing.assert_allclose(ours[:, j], theirs[key].numpy(), rtol=1e-4, atol=1e-4)
    assert model.head.log_sigma[1].item() == pytest.approx(0.1)

    saved = model.save(tmp_path / "imported")
    again = load_or_init(saved, input_dim=768, encoder_id=mert_encoder_id(), seed=0, layers=[2, 5, 8, 12])
    assert again.version == model.version and again.card.training is not None
    assert again.card.training["checkpoint_file"] == "best_model.pt"


class _Payload:
    """Stands for any object a pickle could smuggle in."""


def test_released_import_refuses_unsafe_or_foreign_files(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "x": _Payload()}, evil)
    with pytest.raises(ReleasedCheckpointError, match="weights_only"):
        load_released(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model_state": {"encoder.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(ReleasedCheckpointError, match=r"encoder\.weight"):
        load_released(foreign)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from consumers.model_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.fn(args))


def test_cli_embed_train_eval_import(
    small: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APEXRANK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("APEXRANK_ENCODER", "logmel")
    monkeypatch.setenv("APEXRANK_MODEL__LOGMEL_N_MELS", str(N_MELS))
    monkeypatch.setenv("APEXRANK_AUDIO__SEGMENT_S", "1.0")
    feats, cat = str(tmp_path / "features"), str(small["catalog"])
    assert _cli(["embed", "--catalog", cat, "--out", feats, "--no-progress"]) == 0
    assert f"{SMALL_SONGS} embedded" in capsys.readouterr().out
    model_dir = tmp_path / "model"
    common = ["--features", feats, "--catalog", cat]
    assert _cli(["train", *common, "--out", str(model_dir), "--epochs", "2", "--batch-size", "16",
                 "--no-progress", "--promote"]) == 0  # fmt: skip
    assert (tmp_path / "state" / "models" / "current").resolve() == model_dir.resolve()
    battles = tmp_path / "battles.csv"
    ids = read_catalog(small["catalog"]).song_ids
    battles.write_text(
        "song_a,song_b,preference\n" + "".join(f"{ids[i]},{ids[i + 1]},{'ab'[i % 2]}\n" for i in range(40))
    )
    out_json = tmp_path / "eval.json"
    assert _cli(["eval", "--model", str(tmp_path / "state" / "models"), *common, "--battles", str(battles),
                 "--json", str(out_json)]) == 0  # fmt: skip
    data = json.loads(out_json.read_text())
    assert set(data["metrics"]) == set(TASKS) and data["battles"]["n_decided"] == 40

    # Bad input: exit code 2 and a message naming the problem, not a traceback.
    broken = tmp_path / "broken.csv"
    broken.write_text("song_id,audio_uri\nx,file:///x\n")
    assert _cli(["train", "--features", feats, "--catalog", str(broken), "--out", str(tmp_path / "m2")]) == 2
    assert "lacks required columns" in capsys.readouterr().err
    assert _cli(["train", *common, "--out", str(tmp_path / "m3"), "--epochs", "0"]) == 2
    assert "invalid options" in capsys.readouterr().err
    assert _cli(["embed", "--catalog", cat, "--out", feats, "--encoder", "logmel", "--no-progress"]) == 0
    monkeypatch.setenv("APEXRANK_MODEL__LOGMEL_N_MELS", "16")
    assert _cli(["embed", "--catalog", cat, "--out", feats, "--no-progress"]) == 2
    assert "encoder_id" in capsys.readouterr().err

    ckpt = tmp_path / "best_model.pt"
    _paper_checkpoint(ckpt, "full", 2)
    assert _cli(["import-released", "--checkpoint", str(ckpt), "--out", str(tmp_path / "released")]) == 0
    assert json.loads(capsys.readouterr().out)["encoder_id"] == mert_encoder_id()


# --------------------------------------------------------------------------------------
# Acceptance
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_2000(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2,000 seeded synthetic songs of 1.5 s, embedded with logmel (about 15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("accept")
    cat = synth.simulate_catalog(root / "catalog", n_songs=2000, seed=11, duration_s=1.5, workers=2)
    report = embed_catalog(
        cat.catalog_path, root / "features", _settings(segment_s=30.0), progress=False, batch_songs=64
    )
    assert report.embedded == 2000
    return {"catalog": cat.catalog_path, "features": load_features(root / "features")}


def test_acceptance_trained_head_beats_shuffled_targets(synthetic_2000: dict[str, Any]) -> None:
    features: FeatureSet = synthetic_2000["features"]
    ids = features.song_ids
    perm = np.random.default_rng(0).permutation(len(ids))
    test = [ids[i] for i in perm[:400]]
    trainval = [ids[i] for i in perm[400:]]
    scores: dict[bool, dict[str, float]] = {}
    for shuffled in (False, True):
        config = TrainConfig(epochs=20, batch_size=128, lr=2e-3, patience=10, device="cpu", shuffle_targets=shuffled)
        result = train_head(features, synthetic_2000["catalog"], config, song_ids=trainval)
        metrics = evaluate(result.model, features, synthetic_2000["catalog"], song_ids=test)
        scores[shuffled] = {t: m["spearman"] for t, m in metrics.items()}
    real, null = np.mean(list(scores[False].values())), np.mean(list(scores[True].values()))
    print(f"held-out Spearman, trained: {scores[False]}\nshuffled targets: {scores[True]}")
    assert real > 0.35 and abs(null) < 0.12 and real - null > 0.3
    for t in TASKS:
        assert scores[False][t] > scores[True][t] + 0.15, t
