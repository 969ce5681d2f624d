"""The APEX head, model directories and the target transform."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from ranker.errors import ConfigError
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, TASKS
from ranker.model.artifact import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    ModelArtifactError,
    ScoringModel,
)
from ranker.model.head import SHARED_DIMS_BY_DEPTH, ApexHead, HeadConfig
from ranker.model.registry import PROMOTION_LOCK, load_or_init, promote, resolve_model_dir
from ranker.model.target_tables import iso_week
from ranker.model.targets import DEFAULT_GAMMA, TargetTransform

DIM = 32  # small features keep the tests fast; the head's shapes do not depend on it otherwise
ENC = "logmel-test-v1"


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(previous)


def features(n: int, dim: int = DIM, n_layers: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, n_layers, dim)).astype(np.float32)


def trained_model(config: HeadConfig | None = None, steps: int = 3) -> ScoringModel:
    """A head moved away from its initialisation by a few optimiser steps (incl. BatchNorm stats)."""
    cfg = config or HeadConfig(input_dim=DIM)
    torch.manual_seed(7)
    head = ApexHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    x = torch.from_numpy(features(64, cfg.input_dim, cfg.n_layers))
    target = head(x).detach() * 0.9 + 1.0
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        head.loss(head(x), target).backward()
        opt.step()
    return ScoringModel.from_head(
        head,
        encoder_id=ENC,
        training={"epochs": steps, "lr": 1e-2},
        target_transform={"kind": "opaque", "gamma": 0.5},
        metrics={"val": {"streams": {"spearman": 0.5}}},
    )


# Head -------------------------------------------------------------------------------------
def test_head_config_defaults_follow_the_paper() -> None:
    cfg = HeadConfig(input_dim=768)
    assert cfg.tasks == TASKS
    assert cfg.shared_dims == (512, 256) and cfg.branch_dims == (128, 64)
    assert (cfg.shared_dropout, cfg.branch_dropout) == (0.3, 0.1)
    assert cfg.layer_mix == "softmax" and cfg.loss == "uncertainty"
    assert [cfg.weight(t) for t in TASKS] == [5, 5, 1, 1, 1, 1, 1]
    assert HeadConfig(input_dim=768, shared_dims=SHARED_DIMS_BY_DEPTH[3]).shared_depth == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tasks": ("streams", "bogus")},
        {"tasks": ("likes", "streams")},  # not in TASKS order
        {"tasks": ("streams", "streams")},
        {"tasks": ()},
        {"shared_dims": (512, 0)},
        {"shared_dropout": 1.0},
        {"layer_mix": "attention"},
        {"loss": "huber"},
        {"task_weights": {"plays": 1.0}},
        {"task_weights": {"streams": -1.0}},
        {"unexpected": 1},
    ],
)
def test_head_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        HeadConfig(input_dim=DIM, **kwargs)


def test_head_matches_the_paper_architecture() -> None:
    head = ApexHead(HeadConfig(input_dim=768, layer_mix="conv1x1"))
    linears = [(m.in_features, m.out_features) for m in head.trunk.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(768, 512), (512, 256)]
    branch = head.branches["streams"]
    kinds = [type(m).__name__ for m in branch.modules()][1:]
    assert kinds == [
        *["Sequential", "Linear", "BatchNorm1d", "GELU", "Dropout"] * 2,
        "Linear",
    ]
    assert [(m.in_features, m.out_features) for m in branch.modules() if isinstance(m, torch.nn.Linear)] == [
        (256, 128),
        (128, 64),
        (64, 1),
    ]
    assert head.mix.conv is not None and head.mix.conv.in_channels == 4 and head.mix.conv.out_channels == 1
    assert set(head.branches) == set(TASKS)
    assert head.log_sigma.shape == (7,)


@pytest.mark.parametrize("layer_mix", ["softmax", "conv1x1", "mean"])
@pytest.mark.parametrize("depth", [2, 3])
def test_forward_shapes_and_ranges(layer_mix: str, depth: int) -> None:
    cfg = HeadConfig(input_dim=DIM, layer_mix=layer_mix, shared_dims=SHARED_DIMS_BY_DEPTH[depth])
    head = ApexHead(cfg)
    # Large inputs push the sigmoids to their limits: the ranges must hold there too.
    x = torch.from_numpy(features(16)) * 100.0
    for mode in (head.train, head.eval):
        mode()
        out = head(x)
        assert out.shape == (16, 7) and out.dtype == torch.float32
        pop, aes = out[:, :2], out[:, 2:]
        assert bool(((pop >= 0) & (pop <= 100)).all())
        assert bool(((aes >= 1) & (aes <= 5)).all())
    linears = [m for m in head.trunk.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth


def test_popularity_only_head() -> None:
    head = ApexHead(HeadConfig(input_dim=DIM, tasks=POPULARITY_TASKS)).eval()
    out = head(torch.from_numpy(features(5)))
    assert out.shape == (5, 2)
    assert set(head.branches) == set(POPULARITY_TASKS)


def test_forward_rejects_wrong_shapes() -> None:
    head = ApexHead(HeadConfig(input_dim=DIM)).eval()
    with pytest.raises(ValueError, match=r"\(batch, 4, 32\)"):
        head(torch.zeros(3, DIM))
    with pytest.raises(ValueError, match=r"\(batch, 4, 32\)"):
        head(torch.zeros(3, 4, DIM + 1))


def test_layer_mixes() -> None:
    x = torch.from_numpy(features(8))
    softmax = ApexHead(HeadConfig(input_dim=DIM, layer_mix="softmax"))
    weights = softmax.mix.weights()
    assert weights is not None
    assert torch.allclose(weights, torch.full((4,), 0.25))  # starts as the plain mean
    assert torch.allclose(softmax.mix(x), x.mean(dim=1), atol=1e-6)
    mean = ApexHead(HeadConfig(input_dim=DIM, layer_mix="mean"))
    assert mean.mix.weights() is None and not list(mean.mix.parameters())
    conv = ApexHead(HeadConfig(input_dim=DIM, layer_mix="conv1x1"))
    assert conv.mix.conv is not None and conv.mix.conv.bias is not None
    expected = torch.einsum("bld,l->bd", x, conv.mix.conv.weight.reshape(-1)) + conv.mix.conv.bias
    assert torch.allclose(conv.mix(x), expected, atol=1e-5)


@pytest.mark.parametrize("informative", [0, 3])
def test_softmax_layer_weights_learn(informative: int) -> None:
    """Only one layer carries the targets' signal: a few steps move the mix toward that layer."""
    head = ApexHead(HeadConfig(input_dim=DIM, layer_mix="softmax", loss="equal"))
    x = features(128)  # 4 layers of independent noise...
    signal = np.tanh(x[:, informative, :4].sum(axis=1) / 2.0)  # ...and the targets follow one layer
    target = np.empty((128, 7), np.float32)
    target[:, :2] = (50.0 + 40.0 * signal)[:, None]
    target[:, 2:] = (3.0 + 1.5 * signal)[:, None]
    assert head.mix.logits is not None
    rest = [p for name, p in head.named_parameters() if not name.startswith("mix.")]
    opt = torch.optim.Adam([{"params": [head.mix.logits], "lr": 0.1}, {"params": rest, "lr": 1e-2}])
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    head.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: more threads only wait on each other (and on a busy machine)
    try:
        for _ in range(40):
            opt.zero_grad()
            head.loss(head(xt), tt).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    weights = head.mix.weights()
    assert weights is not None
    others = [float(w) for i, w in enumerate(weights) if i != informative]
    assert int(weights.argmax()) == informative, weights
    assert float(weights[informative]) > 0.3 and float(weights[informative]) - max(others) > 0.1, weights
    assert float(weights.sum()) == pytest.approx(1.0)


# Loss -------------------------------------------------------------------------------------
def _pred_target() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.tensor([[50.0, 40.0, 3.0, 3.0, 3.0, 3.0, 3.0], [60.0, 20.0, 2.0, 4.0, 3.0, 1.0, 5.0]])
    target = torch.tensor([[55.0, 40.0, 3.5, 3.0, 2.0, 3.0, 3.0], [50.0, 30.0, 2.0, 5.0, 3.0, 2.0, 4.0]])
    return pred, target


@pytest.mark.parametrize("mode", ["equal", "weighted", "uncertainty"])
def test_loss_modes_match_their_formulas(mode: str) -> None:
    head = ApexHead(HeadConfig(input_dim=DIM, loss=mode))
    with torch.no_grad():
        head.log_sigma.copy_(torch.linspace(-0.5, 0.5, 7))
    pred, target = _pred_target()
    mse = ((pred - target) ** 2).mean(dim=0)
    if mode == "equal":
        expected = mse.sum()
    elif mode == "weighted":
        expected = (mse * torch.tensor([5.0, 5, 1, 1, 1, 1, 1])).sum()
    else:
        s = head.log_sigma.detach()
        expected = (mse / (2 * torch.exp(s) ** 2) + s).sum()
    assert torch.allclose(head.loss(pred, target), expected)
    weights = head.loss_weights()
    assert list(weights) == list(TASKS)


def test_custom_task_weights() -> None:
    head = ApexHead(HeadConfig(input_dim=DIM, loss="weighted", task_weights={"streams": 2.0}))
    pred, target = _pred_target()
    mse = ((pred - target) ** 2).mean(dim=0)
    expected = (mse * torch.tensor([2.0, 1, 1, 1, 1, 1, 1])).sum()  # unnamed tasks weigh 1
    assert torch.allclose(head.loss(pred, target), expected)


@pytest.mark.parametrize("mode", ["equal", "weighted", "uncertainty"])
def test_loss_ignores_missing_targets(mode: str) -> None:
    head = ApexHead(HeadConfig(input_dim=DIM, loss=mode))
    x = torch.from_numpy(features(4))
    pred = head(x)
    target = pred.detach().clone() + 1.0
    target[0, 0] = float("nan")  # streams unknown for song 0
    target[:, 6] = float("nan")  # naturalness unknown everywhere
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[1, 1] = False  # likes masked out for song 1
    mse, counts = head.task_mse(pred, target, mask)
    assert counts.tolist() == [3, 3, 4, 4, 4, 4, 0]
    assert torch.allclose(mse[:6], torch.ones(6)) and mse[6] == 0
    loss = head.loss(pred, target, mask)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    if mode == "uncertainty":
        assert head.log_sigma.grad is not None
        assert head.log_sigma.grad[6] == 0  # no data: sigma is left alone
    # The masked and NaN entries do not change the loss, whatever value they hold.
    other = target.clone()
    other[1, 1] = 1e6
    assert torch.allclose(head.loss(pred.detach(), other, mask), head.loss(pred.detach(), target, mask))


def test_loss_with_no_known_targets_is_zero_and_differentiable() -> None:
    head = ApexHead(HeadConfig(input_dim=DIM))
    pred = head(torch.from_numpy(features(4)))
    loss = head.loss(pred, torch.full_like(pred, float("nan")))
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_loss_rejects_mismatched_shapes() -> None:
    head = ApexHead(HeadConfig(input_dim=DIM))
    with pytest.raises(ValueError, match="pred and target"):
        head.loss(torch.zeros(2, 7), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="mask"):
        head.loss(torch.zeros(2, 7), torch.zeros(2, 7), torch.ones(2, 6, dtype=torch.bool))


def test_training_reduces_the_loss() -> None:
    torch.manual_seed(3)
    head = ApexHead(HeadConfig(input_dim=DIM, loss="weighted"))
    x = torch.from_numpy(features(128))
    w = torch.randn(DIM)
    signal = torch.sigmoid(x.mean(dim=1) @ w / 4)
    target = torch.stack([signal * 100, (1 - signal) * 100, *(signal * 4 + 1 for _ in AESTHETIC_TASKS)], dim=1)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    head.train()
    first = float(head.loss(head(x), target).detach())
    for _ in range(60):
        opt.zero_grad()
        head.loss(head(x), target).backward()
        opt.step()
    head.eval()
    assert float(head.loss(head(x), target).detach()) < 0.5 * first


# Seeded head, save and load ----------------------------------------------------------------
def test_seeded_head_is_deterministic() -> None:
    a = ScoringModel.from_seed(DIM, 42, ENC)
    torch.manual_seed(999)  # the global RNG must not matter
    b = ScoringModel.from_seed(DIM, 42, ENC)
    c = ScoringModel.from_seed(DIM, 43, ENC)
    x = features(10)
    assert a.version == b.version
    assert a.version.startswith("untrained-seed42-") and len(a.version.rsplit("-", 1)[1]) == 12
    assert c.version.startswith("untrained-seed43-") and c.version != a.version
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    assert not np.array_equal(a.predict(x), c.predict(x))
    assert not a.trained and a.tasks == TASKS and a.encoder_id == ENC
    assert a.version != ScoringModel.from_seed(DIM, 42, "other-encoder").version


def test_seeded_head_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ScoringModel.from_seed(DIM, 42, ENC)
    assert torch.equal(torch.rand(3), expected)


def test_predict_shapes_ranges_and_batching() -> None:
    model = trained_model()
    x = features(37)
    out = model.predict(x)
    assert out.shape == (37, 7) and out.dtype == np.float32
    assert ((out[:, :2] >= 0) & (out[:, :2] <= 100)).all()
    assert ((out[:, 2:] >= 1) & (out[:, 2:] <= 5)).all()
    np.testing.assert_allclose(model.predict(x, batch_size=5), out, rtol=1e-5, atol=1e-4)
    # Eval mode: one song scores the same alone as in a batch.
    np.testing.assert_allclose(model.predict(x[3:4]), out[3:4], rtol=1e-5, atol=1e-4)
    assert model.predict(np.zeros((0, 4, DIM), np.float32)).shape == (0, 7)
    assert not model.head.training


def test_predict_rejects_bad_features() -> None:
    model = ScoringModel.from_seed(DIM, 42, ENC)
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((2, 3, DIM), np.float32))
    bad = features(5)
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        model.predict(bad)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = trained_model()
    assert model.trained and model.version.startswith("apex-")
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE])
    loaded = ScoringModel.load(path)
    x = features(20)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.version == model.version
    assert loaded.card.training == {"epochs": 3, "lr": 0.01}
    assert loaded.target_transform == {"kind": "opaque", "gamma": 0.5}
    assert loaded.metrics == model.metrics
    assert loaded.layers == (2, 5, 8, 12)
    card = json.loads((path / CONFIG_FILE).read_text())
    assert card["model_version"] == model.version and card["head"]["input_dim"] == DIM
    assert "created_at" in card
    # Saving the same model again is a no-op; no temp directories are left behind.
    assert model.save(path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_another_target_transform_makes_another_version_of_the_same_head(tmp_path: Path) -> None:
    model = trained_model()
    other = model.with_target_transform({"kind": "opaque", "gamma": 0.25})
    assert other.target_transform == {"kind": "opaque", "gamma": 0.25} and other.version != model.version
    assert model.target_transform == {"kind": "opaque", "gamma": 0.5}  # the original is untouched
    x = features(20)
    np.testing.assert_array_equal(other.predict(x), model.predict(x))
    assert other.card.training == model.card.training and other.layers == model.layers
    noted = model.with_target_transform({"kind": "opaque"}, training={"retrain_targets": "exposure"})
    assert noted.card.training == {**(model.card.training or {}), "retrain_targets": "exposure"}
    loaded = ScoringModel.load(noted.save(tmp_path / "noted"))
    assert loaded.version == noted.version and loaded.target_transform == {"kind": "opaque"}


def test_a_model_saved_before_input_norm_existed_loads_with_its_version(tmp_path: Path) -> None:
    model = trained_model()
    assert not model.head.config.input_norm
    path = model.save(tmp_path / "m")
    card = json.loads((path / CONFIG_FILE).read_text())
    del card["head"]["input_norm"]  # what the code before the field wrote
    (path / CONFIG_FILE).write_text(json.dumps(card))
    loaded = ScoringModel.load(path)
    assert loaded.version == model.version and not loaded.head.config.input_norm
    # With standardised inputs the statistics are part of the weights, hence of the version.
    normed = ScoringModel.from_seed(DIM, 0, "enc", head_config=HeadConfig(input_dim=DIM, input_norm=True))
    again = ScoringModel.load(normed.save(tmp_path / "n"))
    assert again.head.config.input_norm and again.version == normed.version
    assert "in_mean" in again.head.state_dict()


@pytest.mark.parametrize(
    "config",
    [
        HeadConfig(input_dim=DIM, layer_mix="conv1x1", shared_dims=(512, 384, 256)),
        HeadConfig(input_dim=DIM, layer_mix="mean", tasks=POPULARITY_TASKS, loss="equal"),
    ],
)
def test_round_trip_of_variants(tmp_path: Path, config: HeadConfig) -> None:
    model = trained_model(config)
    loaded = ScoringModel.load(model.save(tmp_path / "m"))
    x = features(6)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.card.head == config


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    a = trained_model()
    b = trained_model()
    assert a.version == b.version  # same weights and card; created_at is not hashed
    c = trained_model(steps=4)
    assert c.version != a.version
    head = a.head
    d = ScoringModel.from_head(head, encoder_id=ENC, training={"epochs": 99})
    assert d.version != a.version


def test_existing_directory_of_another_model_is_not_overwritten(tmp_path: Path) -> None:
    path = trained_model().save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="already holds"):
        ScoringModel.from_seed(DIM, 1, ENC).save(path)


def test_weights_are_safetensors_only(tmp_path: Path) -> None:
    model = trained_model()
    path = model.save(tmp_path / "m")
    tensors = load_file(path / WEIGHTS_FILE)  # a plain safetensors file
    assert set(tensors) == set(model.head.state_dict())
    # A directory holding only a pickle checkpoint is refused, and the pickle is never opened.
    other = tmp_path / "pickled"
    other.mkdir()
    (other / CONFIG_FILE).write_bytes((path / CONFIG_FILE).read_bytes())
    (other / "model.pt").write_bytes(b"\x80\x04 not even a real pickle")
    with pytest.raises(ModelArtifactError, match=r"no model\.safetensors \(found model\.pt"):
        ScoringModel.load(other)


def test_missing_and_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    good = trained_model().save(tmp_path / "good")

    def copy(name: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        return target

    with pytest.raises(ModelArtifactError, match="does not exist"):
        ScoringModel.load(tmp_path / "nowhere")

    no_config = copy("no-config")
    (no_config / CONFIG_FILE).unlink()
    with pytest.raises(ModelArtifactError, match=r"has no config\.json"):
        ScoringModel.load(no_config)

    bad_json = copy("bad-json")
    (bad_json / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ModelArtifactError, match="not a valid model config"):
        ScoringModel.load(bad_json)

    bad_schema = copy("bad-schema")
    card = json.loads((bad_schema / CONFIG_FILE).read_text())
    card["head"]["layer_mix"] = "attention"
    (bad_schema / CONFIG_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelArtifactError, match=r"head\.layer_mix"):
        ScoringModel.load(bad_schema)

    truncated = copy("truncated")
    data = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelArtifactError, match="not a readable safetensors file"):
        ScoringModel.load(truncated)

    flipped = copy("flipped")
    raw = bytearray((flipped / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0x01  # one bit of one weight
    (flipped / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelArtifactError, match="changed or corrupted"):
        ScoringModel.load(flipped)

    wrong_shape = copy("wrong-shape")
    tensors = load_file(wrong_shape / WEIGHTS_FILE)
    tensors["trunk.0.0.weight"] = torch.zeros(512, DIM + 1)
    save_file(tensors, wrong_shape / WEIGHTS_FILE)
    with pytest.raises(ModelArtifactError, match=r"wrong shape: trunk\.0\.0\.weight"):
        ScoringModel.load(wrong_shape)

    missing_tensor = copy("missing-tensor")
    tensors = load_file(missing_tensor / WEIGHTS_FILE)
    del tensors["log_sigma"]
    save_file(tensors, missing_tensor / WEIGHTS_FILE)
    with pytest.raises(ModelArtifactError, match=r"missing tensors \['log_sigma'\]"):
        ScoringModel.load(missing_tensor)

    nan_weights = copy("nan-weights")
    tensors = load_file(nan_weights / WEIGHTS_FILE)
    tensors["log_sigma"] = torch.full_like(tensors["log_sigma"], float("nan"))
    save_file(tensors, nan_weights / WEIGHTS_FILE)
    with pytest.raises(ModelArtifactError, match="NaN"):
        ScoringModel.load(nan_weights)

    # Metrics are informational: an unreadable metrics.json does not stop the model loading.
    bad_metrics = copy("bad-metrics")
    (bad_metrics / METRICS_FILE).write_text("{")
    assert ScoringModel.load(bad_metrics).metrics is None


def test_model_artifact_errors_are_config_errors() -> None:
    assert issubclass(ModelArtifactError, ConfigError)


# load_or_init and promote ------------------------------------------------------------------
def test_load_or_init_without_a_model_gives_the_seeded_head(tmp_path: Path) -> None:
    for head_dir in (tmp_path / "models" / "current", tmp_path, None):
        model = load_or_init(head_dir, input_dim=DIM, encoder_id=ENC, seed=42)
        assert model.version == ScoringModel.from_seed(DIM, 42, ENC).version


def test_load_or_init_follows_current(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model = trained_model()
    path = model.save_versioned(root)
    assert path == root / model.version
    assert promote(root, path) == model.version
    current = root / "current"
    assert current.is_symlink() and os.readlink(current) == model.version  # relative link
    for head_dir in (current, root, path):
        loaded = load_or_init(head_dir, input_dim=DIM, encoder_id=ENC, seed=42)
        assert loaded.version == model.version

    # A newer model replaces the link atomically.
    newer = trained_model(steps=5)
    promote(root, newer.save_versioned(root))
    assert load_or_init(current, input_dim=DIM, encoder_id=ENC, seed=42).version == newer.version
    # No temporary left behind: the only dot file is the promotions' lock (flock; never stale).
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [PROMOTION_LOCK]


def test_load_or_init_follows_a_current_file(tmp_path: Path) -> None:
    model = trained_model()
    model.save_versioned(tmp_path)
    (tmp_path / "current").write_text(model.version + "\n")
    for head_dir in (tmp_path, tmp_path / "current"):
        assert load_or_init(head_dir, input_dim=DIM, encoder_id=ENC, seed=1).version == model.version
    # promote turns the file into a symlink.
    promote(tmp_path, tmp_path / model.version)
    assert (tmp_path / "current").is_symlink()


def test_broken_current_pointer_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "current").write_text("apex-000000000000\n")
    with pytest.raises(ModelArtifactError, match="is not a directory"):
        load_or_init(tmp_path, input_dim=DIM, encoder_id=ENC, seed=42)
    other = tmp_path / "other"
    other.mkdir()
    os.symlink("gone", other / "current")
    with pytest.raises(ModelArtifactError, match="does not exist"):
        resolve_model_dir(other / "current")


def test_load_or_init_rejects_a_model_for_another_encoder(tmp_path: Path) -> None:
    root = tmp_path / "models"
    promote(root, trained_model().save_versioned(root))
    with pytest.raises(ConfigError, match="trained on encoder 'logmel-test-v1', the configured encoder is 'mert-95m'"):
        load_or_init(root / "current", input_dim=DIM, encoder_id="mert-95m", seed=42)
    with pytest.raises(ConfigError, match=r"expects features of shape \(4, 32\).*\(4, 768\)"):
        load_or_init(root / "current", input_dim=768, encoder_id=ENC, seed=42)
    with pytest.raises(ConfigError, match="layers"):
        load_or_init(root / "current", input_dim=DIM, encoder_id=ENC, seed=42, layers=[1, 2, 3, 4])


def test_promote_refuses_a_broken_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    good = trained_model().save_versioned(root)
    promote(root, good)
    broken = root / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{}")
    with pytest.raises(ModelArtifactError):
        promote(root, broken)
    assert resolve_model_dir(root) == (root / good.name).resolve()  # still the old model


# Target transform ---------------------------------------------------------------------------
def engagement(n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    """Heavy-tailed counts with many zeros, two generators over three weeks."""
    rng = np.random.default_rng(seed)
    streams = np.floor(rng.pareto(1.2, n) * 20) * (rng.random(n) > 0.3)
    likes = np.floor(streams * rng.uniform(0, 0.2, n))
    generator = np.array(["suno-v5" if i % 3 else "udio-1" for i in range(n)], dtype=object)
    days = rng.integers(0, 21, n)
    created_at = np.datetime64("2026-02-02T12:00") + days.astype("timedelta64[D]")  # a Monday
    return {"streams": streams, "likes": likes, "generator": generator, "created_at": created_at}


def test_percentiles_are_mid_ranks_and_scores_follow_gamma() -> None:
    counts = np.array([0.0, 0, 0, 0, 5, 10, 10, 20, 100, 1000])
    tf = TargetTransform.fit({"streams": counts}, tasks=["streams"], gamma=0.5)
    pct = tf.percentile("streams", counts)
    # 4 zeros: mid-rank 20th percentile; the single 1000 sits at 95.
    np.testing.assert_allclose(pct, [20, 20, 20, 20, 45, 60, 60, 75, 85, 95])
    scores = tf.transform({"streams": counts})["streams"]
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, 100 * (pct / 100) ** 0.5, rtol=1e-6)
    assert TargetTransform.fit({"streams": counts}, tasks=["streams"], gamma=1.0).transform({"streams": counts})[
        "streams"
    ][4] == pytest.approx(45)


def test_transform_is_monotone_and_compresses_the_top() -> None:
    data = engagement()
    tf = TargetTransform.fit(data)
    grid = np.concatenate([np.linspace(0, 50, 200), np.geomspace(50, 1e7, 200)])
    for task in ("streams", "likes"):
        s = tf.score_from_percentile(tf.percentile(task, grid))
        assert np.all(np.diff(s) >= 0)
        assert s.min() >= 0 and s.max() <= 100
    pct = np.array([0.0, 10, 50, 90, 100])
    s = tf.score_from_percentile(pct)
    assert s[4] - s[3] < s[1] - s[0]  # top decile narrower than bottom decile
    assert tf.gamma == DEFAULT_GAMMA < 1


def test_inverse_round_trips() -> None:
    data = engagement()
    tf = TargetTransform.fit(data)
    pct = tf.percentile("streams", data["streams"])
    np.testing.assert_allclose(tf.inverse(tf.score_from_percentile(pct)), pct, atol=1e-9)
    # Reference counts come back from their own score (exact knots: every distinct count).
    scores = tf.transform(data)["streams"].astype(np.float64)
    np.testing.assert_allclose(tf.expected_count("streams", scores), data["streams"], rtol=1e-4, atol=1e-3)
    counts = tf.expected_count("streams", np.linspace(0, 100, 50))
    assert np.all(np.diff(counts) >= 0)
    rate = tf.expected_rate(np.array([90.0, 10.0]), np.array([90.0, 90.0]))
    assert rate.shape == (2,) and ((rate >= 0) & (rate <= 1)).all() and rate[0] >= rate[1]


def _rated_songs(seed: int, n: int, streams_sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true like rate, streams, likes) of ``n`` songs: rates uniform on 0.02-0.3, lognormal streams."""
    rng = np.random.default_rng(seed)
    true_rate = rng.uniform(0.02, 0.3, n)
    streams = np.floor(rng.lognormal(4, streams_sd, n)) + 1
    likes = rng.binomial(streams.astype(np.int64), true_rate).astype(np.float64)
    return true_rate, streams, likes


def test_the_prior_like_rate_follows_the_likes_score_through_an_increasing_curve() -> None:
    _, streams, likes = _rated_songs(11, 4000, 1.2)
    tf = TargetTransform.fit({"streams": streams, "likes": likes})
    grid = np.linspace(0, 100, 101)
    curve = tf.expected_rate(grid, np.full(101, 50.0))
    assert np.all(np.diff(curve) >= 0) and 0 <= curve[0] < curve[-1] <= 1
    # It does not depend on the streams score, and it survives serialisation.
    np.testing.assert_array_equal(curve, tf.expected_rate(grid, np.zeros(101)))
    again = TargetTransform.from_dict(tf.to_dict())
    np.testing.assert_array_equal(again.expected_rate(grid, grid), curve)
    # Streams-weighted, the curve's rates average to the pooled like rate of the data.
    scores = tf.transform({"streams": streams, "likes": likes})["likes"].astype(np.float64)
    fitted = tf.expected_rate(scores, scores)
    assert np.average(fitted, weights=streams) == pytest.approx(likes.sum() / streams.sum(), rel=0.05)
    # A transform saved before the curve existed keeps the ratio of the two expected counts.
    old = tf.to_dict()
    del old["like_rate"]
    legacy = TargetTransform.from_dict(old)
    ratio = legacy.expected_count("likes", [80.0]) / legacy.expected_count("streams", [60.0])
    np.testing.assert_allclose(legacy.expected_rate([80.0], [60.0]), np.clip(ratio, 0, 1))
    broken = tf.to_dict() | {"like_rate": {"x": [1.0, 0.5], "y": [0.1, 0.2]}}
    with pytest.raises(ValueError, match="like-rate curve"):
        TargetTransform.from_dict(broken)


def test_the_like_rate_curve_can_be_refitted_on_other_scores() -> None:
    true_rate, streams, likes = _rated_songs(5, 3000, 1.0)
    tf = TargetTransform.fit({"streams": streams, "likes": likes})
    # Scores that know the true rate (a head that predicts taste), against raw likes that mostly
    # follow streams: the refitted curve spans far more of the true range than the original.
    predicted = 100 * (true_rate - 0.02) / 0.28
    refit = tf.with_like_rate(predicted, likes, streams)
    grid = np.array([5.0, 50.0, 95.0])
    rates = refit.expected_rate(grid, grid)
    assert np.all(np.diff(rates) > 0)
    np.testing.assert_allclose(rates, 0.02 + 0.28 * grid / 100, atol=0.02)
    # Only the curve changes: the tables, the original transform and serialisation are intact.
    assert refit.to_dict()["tables"] == tf.to_dict()["tables"]
    assert tf.expected_rate(grid, grid).tolist() != rates.tolist()
    np.testing.assert_array_equal(TargetTransform.from_dict(refit.to_dict()).expected_rate(grid, grid), rates)
    with pytest.raises(ValueError, match="negative"):
        tf.with_like_rate(predicted, -likes, streams)


def test_isotonic_fit_pools_ties_as_a_whole() -> None:
    from ranker.model.target_tables import _isotonic

    ones = np.ones(4)
    # A tie group is one point: (0: .5) then (1: mean of .4 and .9 = .65), already increasing.
    assert _isotonic(np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.5, 0.5, 0.4, 0.9]), ones) == [(0.0, 0.5), (1.0, 0.65)]
    # Violators pool, weighted: .3 (w 1) and .1 (w 3) -> .15 at x = (0*1 + 1*3) / 4.
    fit = _isotonic(np.array([0.0, 1.0, 2.0]), np.array([0.3, 0.1, 0.4]), np.array([1.0, 3.0, 1.0]))
    assert fit == [(pytest.approx(0.75), pytest.approx(0.15)), (2.0, 0.4)]


def test_thinned_knots_stay_close_and_monotone() -> None:
    rng = np.random.default_rng(3)
    counts = np.floor(rng.lognormal(3, 2, 20_000))
    exact = TargetTransform.fit({"streams": counts}, tasks=["streams"], max_knots=100_000)
    thin = TargetTransform.fit({"streams": counts}, tasks=["streams"], max_knots=64)
    assert len(thin.to_dict()["tables"]["streams"]["all"]["x"]) <= 66
    a, b = exact.percentile("streams", counts), thin.percentile("streams", counts)
    assert np.abs(a - b).max() < 2.0
    grid = np.geomspace(1, 1e6, 500)
    assert np.all(np.diff(thin.percentile("streams", grid)) >= 0)


def test_cohorts_rank_within_generator_and_week() -> None:
    # Two generators with very different exposure: within its cohort each song ranks the same.
    data = {
        "streams": np.concatenate([np.arange(60.0), np.arange(60.0) * 100]),
        "generator": np.array(["small"] * 60 + ["big"] * 60, dtype=object),
        "created_at": ["2026-02-03T10:00:00Z"] * 120,
    }
    pooled = TargetTransform.fit(data, tasks=["streams"]).transform(data)["streams"]
    cohort = TargetTransform.fit(data, tasks=["streams"], cohort="generator_week")
    scores = cohort.transform(data)["streams"]
    np.testing.assert_allclose(scores[:60], scores[60:])
    assert not np.allclose(pooled[:60], pooled[60:])
    assert "cohort:small|2026-W06" in cohort.groups("streams")
    # Unknown week: falls back to the generator; unknown generator: to all songs.
    p_week = cohort.percentile("streams", [500.0], generator="big", created_at="2030-01-01")
    p_gen = cohort.percentile("streams", [500.0], generator="big", created_at="2026-02-03")
    p_all = cohort.percentile("streams", [500.0], generator="new-model", created_at="2026-02-03")
    assert p_week == pytest.approx(p_gen)
    assert p_all != pytest.approx(p_gen)


def test_small_cohorts_fall_back() -> None:
    data = engagement(300)
    tf = TargetTransform.fit(data, cohort="generator_week", min_cohort_size=60)
    groups = tf.groups("streams")
    assert "all" in groups and "generator:udio-1" in groups
    # udio-1 has about 100 songs over 3 weeks: its weekly cohorts are too small to stand alone.
    assert not [g for g in groups if g.startswith("cohort:udio-1|")]
    assert [g for g in groups if g.startswith("cohort:suno-v5|")]
    assert np.isfinite(tf.transform(data)["streams"]).all()


def test_to_dict_round_trip() -> None:
    data = engagement()
    tf = TargetTransform.fit(data, cohort="generator_week", gamma=0.7, min_cohort_size=40)
    blob = json.loads(json.dumps(tf.to_dict()))
    again = TargetTransform.from_dict(blob)
    assert again.gamma == 0.7 and again.cohort == "generator_week" and again.tasks == tf.tasks
    for task in tf.tasks:
        np.testing.assert_array_equal(again.transform(data)[task], tf.transform(data)[task])
    broken = json.loads(json.dumps(blob))
    broken["tables"]["streams"]["all"]["pct"] = broken["tables"]["streams"]["all"]["pct"][::-1]
    with pytest.raises(ValueError, match="strictly increasing"):
        TargetTransform.from_dict(broken)
    with pytest.raises(ValueError, match="not a percentile-power"):
        TargetTransform.from_dict({"kind": "other"})


def test_transform_parameters_fit_in_a_model_card(tmp_path: Path) -> None:
    tf = TargetTransform.fit(engagement())
    model = ScoringModel.from_head(
        ApexHead(HeadConfig(input_dim=DIM)), encoder_id=ENC, training={}, target_transform=tf.to_dict()
    )
    loaded = ScoringModel.load(model.save(tmp_path / "m"))
    assert loaded.target_transform is not None
    assert TargetTransform.from_dict(loaded.target_transform).to_dict() == tf.to_dict()


@pytest.mark.parametrize(
    ("streams", "match"),
    [
        ([1.0, -2.0, 3.0, -1.0], r"streams counts are negative or infinite at rows \[1, 3\]"),
        ([1.0, np.nan, 3.0, 4.0], r"streams counts are missing \(NaN\) at rows \[1\]"),
        ([1.0, np.inf, 3.0, 4.0], r"negative or infinite at rows \[1\]"),
    ],
)
def test_bad_counts_name_their_rows(streams: list[float], match: str) -> None:
    data = {"streams": np.array(streams), "likes": np.zeros(4)}
    with pytest.raises(ValueError, match=match):
        TargetTransform.fit(data)
    tf = TargetTransform.fit({"streams": np.arange(4.0), "likes": np.zeros(4)})
    with pytest.raises(ValueError, match=match):
        tf.transform(data)


def test_missing_counts_when_allowed() -> None:
    data = {"streams": np.array([0.0, 5, np.nan, 10]), "likes": np.array([np.nan, 1, 2, 3])}
    tf = TargetTransform.fit(data, allow_missing=True)
    out = tf.transform(data, allow_missing=True)
    assert np.isnan(out["streams"][2]) and np.isnan(out["likes"][0])
    assert np.isfinite(out["streams"][[0, 1, 3]]).all()


def test_bad_cohort_columns_name_their_rows() -> None:
    data = engagement(12)
    data["generator"] = data["generator"].copy()
    data["generator"][4] = None
    with pytest.raises(ValueError, match=r"generator is missing at rows \[4\]"):
        TargetTransform.fit(data, cohort="generator_week")
    data = engagement(12)
    data["created_at"] = np.array(["2026-02-03"] * 5 + ["not a date"] + ["2026-02-03"] * 6, dtype=object)
    with pytest.raises(ValueError, match=r"created_at is missing or not a date at rows \[5\]"):
        TargetTransform.fit(data, cohort="generator_week")
    with pytest.raises(ValueError, match="no column 'likes'"):
        TargetTransform.fit({"streams": np.zeros(3)})


def test_iso_weeks() -> None:
    assert iso_week("2026-02-09T01:00:00+02:00") == "2026-W06"  # still Sunday in UTC
    assert iso_week(datetime(2026, 2, 3, tzinfo=UTC)) == "2026-W06"
    assert iso_week(np.datetime64("2026-02-08T23:59")) == "2026-W06"
    assert iso_week(date(2026, 2, 9)) == "2026-W07"
    with pytest.raises(ValueError):
        iso_week(np.datetime64("NaT"))


def test_targets_module_does_not_need_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ranker.model.targets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
