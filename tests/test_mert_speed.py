"""MERT speed options on the CPU with tiny checkpoints: each leaves the pooled features as
they were (fp32 options exactly, bf16 within the agreement bar), and bf16 agreement itself.

The options exist for the GPU (benchmarks/mert_device.py measures them there); here they
must run, and where one is CUDA-only, be a no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ranker.encoders.mert as mert_module
from ranker.encoders import pool_song
from ranker.encoders.mert import MertEncoder
from ranker.errors import ConfigError
from ranker.settings import ModelSettings
from tests.test_encoders import SR, _save_tiny, noise

#: The bar of issue 18: bf16 pooled song embeddings against fp32, every song.
AGREEMENT = 0.999
#: The same songs after taking out their common part; see test_bf16_agreement_with_fp32.
CENTRED_FLOOR = 0.995


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mert-speed")
    _save_tiny(root / "tiny12")
    _save_tiny(root / "tiny2", num_hidden_layers=2)  # compile traces every layer: keep it short
    return {"12": root / "tiny12", "2": root / "tiny2"}


def encoder(path: Path, batch_size: int = 8, **kw: Any) -> MertEncoder:
    return MertEncoder(ModelSettings(mert_model=str(path), device="cpu", **kw), offline=True, batch_size=batch_size)


def mixed_segments() -> list[np.ndarray]:
    """Full segments and tails of several lengths, so batches are padded and masked."""
    return [noise(s, i) for i, s in enumerate([2.0, 0.7, 1.6, 2.0, 0.3, 1.1, 0.02])]


@pytest.mark.parametrize(
    "options",
    [
        {"attn_implementation": "eager"},
        {"attn_implementation": "flash_attention_2"},  # CUDA only: sdpa on the CPU
        {"pin_memory": True},  # CUDA only: a no-op here
        {"half_weights": True},  # precision auto on the CPU is fp32: a no-op here
        {"bucket_s": [0.5, 1.0, 2.0]},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_fp32_options_leave_features_unchanged(ckpt: dict[str, Path], options: dict[str, Any]) -> None:
    segs = mixed_segments()
    ref, ref_frames = encoder(ckpt["2"], batch_size=3, layers=[0, 1, 2]).encode(segs)
    enc = encoder(ckpt["2"], batch_size=3, layers=[0, 1, 2], **options)
    got, frames = enc.encode(segs)
    np.testing.assert_array_equal(frames, ref_frames)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert next(enc.model.parameters()).dtype == torch.float32
    assert enc.attn_implementation == ("eager" if options.get("attn_implementation") == "eager" else "sdpa")
    assert enc._host_buffer(2, 10).is_pinned() is False


def test_buckets_bound_the_batch_shapes(ckpt: dict[str, Path]) -> None:
    enc = encoder(ckpt["2"], batch_size=8, layers=[0, 1, 2], bucket_s=[2.0, 1.0, 0.5])
    assert enc.bucket_edges == [SR // 2, SR, 2 * SR]
    lengths = [round(s * SR) for s in (2.0, 0.7, 1.6, 2.0, 0.3, 1.1, 0.02, 2.5)]
    batches = list(enc._batches(lengths))
    widths = {enc.padded_width(max(max(lengths[i], 400) for i in b)) for b in batches}
    # One bucket per batch; a clip past the last bucket keeps its own (CPU: exact) width.
    assert sorted(widths) == [SR // 2, SR, 2 * SR, round(2.5 * SR)]
    for b in batches:
        assert len({enc.bucket(max(lengths[i], 400)) for i in b}) == 1
    with pytest.raises(ConfigError, match="BUCKET_S"):
        encoder(ckpt["2"], layers=[0, 1, 2], bucket_s=[1.0, 0.0])


def test_compile_static_matches_eager(ckpt: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # aot_eager captures the same graph as inductor without generating code (CPU: 15-65 s).
    monkeypatch.setattr(mert_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    segs = [noise(s, i) for i, s in enumerate([2.0, 0.7, 1.6])]
    ref = encoder(ckpt["2"], layers=[0, 1, 2]).encode(segs)[0]
    enc = encoder(ckpt["2"], layers=[0, 1, 2], compile="static", bucket_s=[2.0])
    assert enc._forward is not enc.model
    got = enc.encode(segs)[0]  # one padded batch of width 2 s: the masked norm runs traced
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a2 * b2, axis=1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))


def test_bf16_agreement_with_fp32(ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 end to end vs the fp32 path: song embeddings (frame-weighted over each song's
    segments, tails padded in shared batches) at cosine >= 0.999 for every song.

    The raw cosine flatters: on this checkpoint the songs' common part (their fp32 mean) is
    about 92% of a pooled vector's norm and the song-to-song part only 8%, so bf16's error
    (0.35% of the norm) is 4% of what tells songs apart. The cosine after taking out that
    mean is therefore also checked; the tiny random checkpoint reaches about 0.998 there
    (the issue's 0.999 bar is on the raw cosine), so its floor is 0.995: a real fault in
    the bf16 path (a wrong cast, padding leaking in) drops it far lower.
    """
    songs: list[list[np.ndarray]] = []
    for k, seconds in enumerate([3.4, 2.2, 4.0, 2.7, 3.1, 2.0]):
        wave = noise(seconds, 10 + k)
        songs.append([wave[i : i + SR] for i in range(0, len(wave), SR)])  # 1 s segments + a tail
    flat = [s for song in songs for s in song]
    fp32 = encoder(ckpt["12"], batch_size=4)
    bf16 = encoder(ckpt["12"], batch_size=4, precision="bf16", half_weights=True)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.amp_dtype is None

    def song_embeddings(enc: MertEncoder) -> np.ndarray:
        feats, frames = enc.encode(flat)
        out, start = [], 0
        for song in songs:
            out.append(pool_song(feats[start : start + len(song)], frames[start : start + len(song)]))
            start += len(song)
        return np.stack(out)

    ref, got = song_embeddings(fp32), song_embeddings(bf16)
    assert not np.array_equal(ref, got)  # bf16 really ran
    raw = cosines(got, ref)
    centre = ref.mean(axis=0, keepdims=True)
    centred = cosines(got - centre, ref - centre)
    with capsys.disabled():
        print(f"\nbf16 vs fp32 song embeddings: min cosine {raw.min():.6f}, centred {centred.min():.6f}")
    assert raw.min() >= AGREEMENT
    assert centred.min() >= CENTRED_FLOOR
