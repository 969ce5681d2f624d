"""Encoders: the weight-free log-mel baseline and MERT loaded from tiny real checkpoints.

The MERT fixtures save a small random ``HubertModel`` with MERT-v1's layout (7 conv
layers with MERT's kernels and strides, group norm, 12 transformer layers) in two
forms: transformers' own ``save_pretrained`` output, and the Hub's MERT layout
(``model_type: mert_model``, remote-code keys, ``pytorch_model.bin`` with the old
``weight_g``/``weight_v`` weight-norm names). Both load through the same code as real
weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranker.encoders import Encoder, build_encoder, pool_song
from ranker.encoders.logmel import LogMelEncoder
from ranker.encoders.mert import MertEncoder
from ranker.errors import ConfigError
from ranker.settings import AudioSettings, ModelSettings, Settings

SR = 24_000


def noise(seconds: float, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    pulse = 1 + np.sin(2 * np.pi * 2 * t)  # loudness that moves, so every statistic has work to do
    x = 0.2 * np.sin(2 * np.pi * (220 + 40 * seed) * t) * pulse + 0.05 * r.standard_normal(t.size)
    return x.astype(np.float32)


def encode_each(enc: Encoder, segs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    parts = [enc.encode([s]) for s in segs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------------------
# Log-mel
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logmel() -> LogMelEncoder:
    return LogMelEncoder(ModelSettings(logmel_n_mels=32), batch_size=4)


def test_logmel_shapes(logmel: LogMelEncoder) -> None:
    assert logmel.name == "logmel"
    assert logmel.encoder_id == "logmel-v1-n32-sr24000"
    assert (logmel.sample_rate, logmel.n_layers, logmel.dim, logmel.vector_dim) == (SR, 4, 32, 64)
    assert LogMelEncoder().encoder_id == "logmel-v1-n96-sr24000"
    feats, frames = logmel.encode([noise(2.0, 1), noise(1.0, 2)])
    assert feats.shape == (2, 4, 32) and feats.dtype == np.float32
    assert frames.dtype == np.int64
    assert frames.tolist() == [1 + (2 * SR - 1024) // 320, 1 + (SR - 1024) // 320]
    assert np.isfinite(feats).all()
    assert (feats[:, 1] >= 0).all() and (feats[:, 2] >= 0).all()  # std, flux
    assert (np.abs(feats[:, 3]) <= 1.0 + 1e-6).all()  # a correlation
    assert logmel.encode([])[0].shape == (0, 4, 32)


def test_logmel_batching_matches_one_at_a_time(logmel: LogMelEncoder) -> None:
    segs = [noise(s, i) for i, s in enumerate([2.0, 0.5, 3.0, 1.0, 0.03, 2.0, 0.7])]
    batched, frames_b = logmel.encode(segs)
    single, frames_s = encode_each(logmel, segs)
    np.testing.assert_array_equal(frames_b, frames_s)
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=1e-5)


def test_logmel_padding_never_enters_statistics(logmel: LogMelEncoder) -> None:
    short = noise(0.8, 5)
    alone, _ = logmel.encode([short])
    for long in (noise(3.0, 6), np.full(3 * SR, 0.9, np.float32)):  # padding next to loud audio too
        batched, frames = logmel.encode([long, short])
        np.testing.assert_allclose(batched[1], alone[0], atol=1e-4)
        assert frames[1] == logmel.frames_for(short.size)
    # Explicit zero padding inside the real samples is audio, and does change the result.
    padded, _ = logmel.encode([np.concatenate([short, np.zeros(SR, np.float32)])])
    assert not np.allclose(padded[0], alone[0], atol=1e-3)


def test_logmel_song_vector(logmel: LogMelEncoder) -> None:
    feats, frames = logmel.encode([noise(2.0, 1), noise(1.0, 1)])
    vec = logmel.song_vector(pool_song(feats, frames))
    assert vec.shape == (logmel.vector_dim,) and vec.dtype == np.float32
    # Level-invariant halves: a louder copy of the same sound gives (nearly) the same vector.
    loud, _ = logmel.encode([noise(2.0, 1) * 4, noise(1.0, 1) * 4])
    vec_loud = logmel.song_vector(pool_song(loud, frames))
    cos = float(vec @ vec_loud / np.linalg.norm(vec) / np.linalg.norm(vec_loud))
    assert cos > 0.99
    np.testing.assert_allclose(vec[:32].mean(), 0.0, atol=1e-5)


def test_base_vector_dim_defaults_to_dim() -> None:
    class Dummy(Encoder):
        name = "dummy"
        encoder_id = "dummy"
        sample_rate = SR
        n_layers = 2
        dim = 5

        def encode(self, segments: Any) -> tuple[np.ndarray, np.ndarray]:
            raise NotImplementedError

    enc = Dummy()
    assert enc.vector_dim == 5
    assert enc.song_vector(np.ones((2, 5), np.float32)).shape == (5,)


# --------------------------------------------------------------------------------------
# MERT: tiny checkpoints with the real layout
# --------------------------------------------------------------------------------------

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 12,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "feat_proj_layer_norm": True,
    "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "layer_norm_eps": 1e-5,
}
# What MERT's remote-code config adds or changes (keys HubertConfig does not know).
MERT_EXTRA = {
    "model_type": "mert_model",
    "architectures": ["MERTModel"],
    "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
    "feature_extractor_cqt": False,
    "feature_extractor_cqt_bins": 336,
    "deepnorm": False,
    "attention_relax": -1.0,
    "sample_rate": 24000,
    "feat_extract_dropout": 0.0,
    "gradient_checkpointing": False,
    "torch_dtype": "float32",
    "transformers_version": "4.25.1",
}


def _save_tiny(directory: Path, **overrides: Any) -> Any:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    model = HubertModel(HubertConfig(**{**TINY, **overrides})).eval()
    # Random init leaves the weight-norm gain tiny; make the positional conv matter.
    with torch.no_grad():
        model.encoder.pos_conv_embed.conv.parametrizations.weight.original0.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return model


def _to_mert_layout(src: Path, dst: Path) -> None:
    """Rewrite a save_pretrained checkpoint the way the MERT repos on the Hub store it."""
    from safetensors.torch import load_file

    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    config.update(MERT_EXTRA)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(str(src / "model.safetensors"))
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith("pos_conv_embed.conv.weight_g") for k in renamed)
    torch.save(renamed, dst / "pytorch_model.bin")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mert")
    hf_dir, hub_dir = root / "tiny-hubert", root / "tiny-mert-hub-layout"
    model = _save_tiny(hf_dir)
    _to_mert_layout(hf_dir, hub_dir)
    ln_dir = root / "tiny-layernorm"
    _save_tiny(ln_dir, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    return {"model": model, "hf": hf_dir, "hub": hub_dir, "layer": ln_dir}


def mert(path: Path, batch_size: int = 8, **kw: Any) -> MertEncoder:
    return MertEncoder(ModelSettings(mert_model=str(path), device="cpu", **kw), offline=True, batch_size=batch_size)


def reference_features(model: Any, seg: np.ndarray, layers: list[int]) -> np.ndarray:
    """The pooled features computed the plain way: one clip, no batching, no padding."""
    x = torch.from_numpy(seg)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.inference_mode():
        hidden = model(x, output_hidden_states=True).hidden_states
    return torch.stack([hidden[i][0].mean(0) for i in layers]).numpy()


def test_mert_shapes_and_id(tiny: dict[str, Any]) -> None:
    enc = mert(tiny["hf"])
    assert enc.name == "mert"
    assert enc.encoder_id == "mert:tiny-hubert:layers=2,5,8,12"
    assert (enc.sample_rate, enc.n_layers, enc.dim, enc.vector_dim) == (SR, 4, 32, 32)
    assert enc.mixes_lengths and enc.device.type == "cpu" and enc.pad_multiple == 1
    feats, frames = enc.encode([noise(1.0, 1), noise(30.0, 2)[: 2 * SR]])
    assert feats.shape == (2, 4, 32) and feats.dtype == np.float32
    assert frames.dtype == np.int64 and frames.tolist() == [74, 149]
    assert enc.frames_for(30 * SR) == 2249  # 75 frames/s, as the real model
    np.testing.assert_allclose(feats[0], reference_features(tiny["model"], noise(1.0, 1), enc.layers), atol=1e-5)


def test_mert_hub_layout_loads_identically(tiny: dict[str, Any]) -> None:
    segs = [noise(1.0, 3), noise(0.6, 4)]
    a, fa = mert(tiny["hf"]).encode(segs)
    b, fb = mert(tiny["hub"]).encode(segs)
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # The renamed weight_g/weight_v tensors landed: the Hub layout's positional conv is the
    # reference model's, gain and direction alike, and so are its features.
    hub = mert(tiny["hub"])
    ref_conv = tiny["model"].encoder.pos_conv_embed.conv
    hub_conv = hub.model.encoder.pos_conv_embed.conv
    for part in ("original0", "original1"):
        torch.testing.assert_close(
            getattr(hub_conv.parametrizations.weight, part), getattr(ref_conv.parametrizations.weight, part)
        )
    torch.testing.assert_close(hub_conv.weight, ref_conv.weight)
    for seg, got in zip(segs, b, strict=True):
        np.testing.assert_allclose(got, reference_features(tiny["model"], seg, hub.layers), atol=1e-5)
    # ... and the comparisons above have teeth: with another positional conv the features move
    # far beyond their tolerance (a checkpoint whose weight_g was dropped would score differently).
    with torch.no_grad():
        hub_conv.parametrizations.weight.original0.mul_(0.5)
    moved, _ = hub.encode(segs)
    assert np.abs(moved - b).max() > 1e-2


def test_mert_batching_equal_lengths(tiny: dict[str, Any]) -> None:
    enc = mert(tiny["hf"], batch_size=3)
    segs = [noise(1.0, i) for i in range(5)]
    batched, _ = enc.encode(segs)
    single, _ = encode_each(enc, segs)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_mert_group_norm_mixed_lengths_are_exact(tiny: dict[str, Any]) -> None:
    """Group norm spans the whole clip: padding is masked out of it and out of attention."""
    enc = mert(tiny["hf"], batch_size=8)
    assert enc.mixes_lengths and enc._masked_norm is not None
    lengths = [SR, SR // 2, SR, 5000, SR // 2, 300]
    assert list(enc._batches(lengths)) == [[0, 2, 1, 4, 3, 5]]
    segs = [noise(n / SR, i) for i, n in enumerate(lengths)]
    batched, frames_b = enc.encode(segs)
    single, frames_s = encode_each(enc, segs)
    np.testing.assert_array_equal(frames_b, frames_s)
    assert frames_b[-1] == 1  # under one receptive field: padded up to a single frame
    np.testing.assert_allclose(batched, single, atol=1e-4)
    # Rounding batch widths up (as on CUDA, so that shapes repeat) changes nothing either.
    enc.pad_multiple = SR // 4
    rounded, _ = enc.encode(segs)
    np.testing.assert_allclose(rounded, single, atol=1e-4)
    np.testing.assert_allclose(encode_each(enc, segs)[0], single, atol=1e-4)
    # ... and all match the stock model run on each clip alone.
    for i in (1, 3):
        np.testing.assert_allclose(batched[i], reference_features(tiny["model"], segs[i], enc.layers), atol=1e-4)


def test_mert_padding_would_leak_without_the_mask(tiny: dict[str, Any]) -> None:
    """Guards the test above: plain zero padding does change a short clip's features."""
    enc = mert(tiny["hf"])
    short = noise(0.5, 7)
    alone, _ = enc.encode([short])
    padded = np.concatenate([short, np.zeros(SR // 2, np.float32)])
    x = torch.from_numpy(padded)[None]
    n = short.size
    x[:, :n] = (x[:, :n] - x[:, :n].mean()) / torch.sqrt(x[:, :n].var(unbiased=False) + 1e-7)
    with torch.inference_mode():
        hidden = tiny["model"](x, output_hidden_states=True).hidden_states
    frames = enc.frames_for(n)
    leaked = torch.stack([hidden[i][0, :frames].mean(0) for i in enc.layers]).numpy()
    assert np.abs(leaked - alone[0]).max() > 1e-2


def test_mert_fallback_keeps_lengths_apart(tiny: dict[str, Any]) -> None:
    """Without the masked norm (unexpected model layout) lengths are never mixed."""
    enc = mert(tiny["hf"], batch_size=8)
    enc.mixes_lengths = False
    enc._masked_norm = None
    assert list(enc._batches([SR, SR // 2, SR, 5000, SR // 2])) == [[0, 2], [1, 4], [3]]


def test_mert_layer_norm_pads_with_mask(tiny: dict[str, Any]) -> None:
    """Layer-norm front ends (MERT-330M) batch mixed lengths with an attention mask, exactly."""
    enc = mert(tiny["layer"], batch_size=8)
    assert enc.mixes_lengths and enc._masked_norm is None
    segs = [noise(s, i) for i, s in enumerate([1.0, 0.5, 0.8, 1.0, 0.25])]
    assert len(list(enc._batches([s.size for s in segs]))) == 1
    batched, frames_b = enc.encode(segs)
    single, frames_s = encode_each(enc, segs)
    np.testing.assert_array_equal(frames_b, frames_s)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_mert_custom_layers(tiny: dict[str, Any]) -> None:
    enc = mert(tiny["hf"], layers=[0, 12])
    assert enc.encoder_id.endswith("layers=0,12") and enc.n_layers == 2
    with pytest.raises(ConfigError, match="LAYERS"):
        mert(tiny["hf"], layers=[2, 13])


def test_mert_refuses_cqt_and_deepnorm(tiny: dict[str, Any], tmp_path: Path) -> None:
    for key in ("feature_extractor_cqt", "deepnorm"):
        bad = tmp_path / key
        bad.mkdir()
        config = json.loads((tiny["hub"] / "config.json").read_text())
        config[key] = True
        (bad / "config.json").write_text(json.dumps(config))
        (bad / "pytorch_model.bin").symlink_to(tiny["hub"] / "pytorch_model.bin")
        with pytest.raises(ConfigError, match=key):
            mert(bad)


def test_mert_missing_weights_offline(tiny: dict[str, Any], tmp_path: Path) -> None:
    # A Hub id that is not in the cache, offline: no network, a clear error.
    with pytest.raises(ConfigError) as info:
        MertEncoder(ModelSettings(mert_model="apexrank-tests/no-such-mert"), offline=True)
    msg = str(info.value)
    assert "APEXRANK_ENCODER=logmel" in msg and "APEXRANK_MODEL__MERT_MODEL=" in msg
    assert "apexrank-tests/no-such-mert" in msg

    for ref in (str(tmp_path / "does-not-exist"), str(tmp_path)):  # missing dir; dir without files
        with pytest.raises(ConfigError, match="APEXRANK_ENCODER=logmel"):
            mert(Path(ref))
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny["hub"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="no weights"):
        mert(only_config)


def test_mert_weights_that_do_not_fit(tiny: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "mismatch"
    bad.mkdir()
    config = json.loads((tiny["hub"] / "config.json").read_text())
    config["hidden_size"] = 64
    config["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "pytorch_model.bin").symlink_to(tiny["hub"] / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="do not fit"):
        mert(bad)


def test_build_encoder(tiny: dict[str, Any]) -> None:
    enc = build_encoder(Settings(encoder="logmel", model=ModelSettings(logmel_n_mels=16)))
    assert isinstance(enc, LogMelEncoder) and enc.dim == 16
    settings = Settings(encoder="mert", model=ModelSettings(mert_model=str(tiny["hub"]), device="cpu"))
    settings.worker.encoder_batch_segments = 3
    enc = build_encoder(settings)
    assert isinstance(enc, MertEncoder) and enc.batch_size == 3
    wrong_rate = Settings(encoder="logmel", audio=AudioSettings(sample_rate=16000))
    with pytest.raises(ConfigError, match="APEXRANK_AUDIO__SAMPLE_RATE"):
        build_encoder(wrong_rate)
    # A MERT that cannot load never falls back to logmel.
    with pytest.raises(ConfigError, match="APEXRANK_ENCODER=logmel"):
        build_encoder(Settings(encoder="mert", model=ModelSettings(mert_model="/nonexistent/MERT-v1-95M")))
