"""MERT-v1-95M forward throughput: batched through the project's encoder vs plain one-clip forwards.

What is measured, and why: the worker encodes every segment of every song in a polled
batch together, in batches of ``encoder_batch_segments`` that cross song boundaries.
That only pays if a batched forward is at least as fast per audio second as one clip
at a time. This script builds the full-size MERT-v1-95M architecture (HuBERT: 7-layer
conv front end with group norm, 12 transformer layers, hidden 768; 94.4 M parameters)
with random weights, saves it with ``save_pretrained`` into a temporary directory and
loads it through ``ranker.encoders.mert.MertEncoder`` (the real code path: per-clip
normalisation, padding/masking, pooling of hidden layers 2, 5, 8 and 12). It times
``encode`` at batch sizes 1, 4 and 16 against, in the same run and on the same
weights, a plain ``HubertModel.from_pretrained`` forward of one clip at a time
(normalise, forward with hidden states, mean-pool the same layers). Figures are audio
seconds encoded per wall second. It also checks that batching changes nothing beyond
float tolerance: features of the batched encoder vs the one-clip baseline, for equal
lengths and for mixed lengths (song tails, which take the padded and masked path).

Random weights cost exactly what trained ones do: the speed of a dense forward does
not depend on the values.

CPU (default): 10 s segments, because one 30 s forward takes about 4.4 s on 2 cores and
batch 16 of 30 s segments would take over a minute per batch; the whole CPU run takes
about 3-5 minutes. ``--segment-s 30`` measures 30 s segments on CPU if you have time.

CUDA (``--device cuda``): 30 s segments, bf16 autocast (the encoder's default precision
on CUDA), ``torch.cuda.synchronize`` around every timed call, peak memory per batch
size, and the bf16-vs-fp32 feature error. It runs with only torch, transformers and
numpy installed: if ``ranker`` cannot be imported (GPU hosts lack pydantic and the rest
of the project's dependencies), a minimal self-contained encoder (equal-length batches
only, same normalisation and pooling) is used instead and the output says so.
``--standalone`` forces that path, so it can be tested anywhere::

    .venv/bin/python benchmarks/mert_forward.py --json bench-mert-cpu.json
    .venv/bin/python benchmarks/mert_forward.py --standalone --rounds 1 --segments 4 --batch-sizes 1,4
    python benchmarks/mert_forward.py --device cuda --batch-sizes 1,4,16,32 --json bench-mert-gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from _common import table

SAMPLE_RATE = 24_000
LAYERS = (2, 5, 8, 12)
NORM_EPS = 1e-7  # MERT's feature extractor: x / sqrt(var + 1e-7)
TOLERANCE = 0.95  # batched may be at most 5% slower per audio second (timing noise), else FAIL

#: MERT-v1-95M's architecture (m-a-p/MERT-v1-95M config.json, CQT and deepnorm off).
MERT_95M: dict[str, Any] = {
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "feat_proj_layer_norm": True,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "num_hidden_layers": 12,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "do_stable_layer_norm": False,
    "sample_rate": SAMPLE_RATE,
}


class SegmentEncoder(Protocol):
    batch_size: int

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------------------
# Model, encoders, baseline
# --------------------------------------------------------------------------------------


def save_random_mert(directory: Path, seed: int, config: dict[str, Any] | None = None) -> int:
    """A MERT-shaped model (``config``; None: full-size MERT-v1-95M) with random weights, saved like a
    checkpoint; returns its parameter count."""
    from transformers import HubertConfig, HubertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    torch.manual_seed(seed)
    model = HubertModel(HubertConfig(**(MERT_95M if config is None else config)))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per clip (rows of ``x``), as MERT's feature extractor does."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + NORM_EPS)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def forward_pooled(model: Any, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """(B, samples) equal-length clips -> (B, len(LAYERS), hidden): normalise, forward, mean-pool."""
    with autocast(x.device, bf16):
        out = model(normalise(x), output_hidden_states=True, return_dict=True)
    return torch.stack([out.hidden_states[i].float().mean(1) for i in LAYERS], dim=1)


class StandaloneEncoder:
    """Needs only torch + transformers: batches equal-length segments, no padding, same pooling."""

    def __init__(self, directory: Path, device: torch.device, bf16: bool, batch_size: int) -> None:
        from transformers import HubertModel

        self.model = HubertModel.from_pretrained(directory).eval().to(device)
        self.device = device
        self.bf16 = bf16
        self.batch_size = batch_size

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(segments)
        hidden = int(self.model.config.hidden_size)
        features = np.zeros((n, len(LAYERS), hidden), dtype=np.float32)
        frames = np.zeros(n, dtype=np.int64)
        order = sorted(range(n), key=lambda i: len(segments[i]), reverse=True)
        batch: list[int] = []
        for i in [*order, -1]:
            if batch and (i < 0 or len(batch) >= self.batch_size or len(segments[i]) != len(segments[batch[0]])):
                x = torch.from_numpy(np.stack([segments[j] for j in batch])).to(self.device)
                features[batch] = forward_pooled(self.model, x, self.bf16).cpu().numpy()
                frames[batch] = int(self.model._get_feat_extract_output_lengths(x.shape[1]))
                batch = []
            if i >= 0:
                batch.append(i)
        return features, frames


def project_encoder(
    directory: Path, device: torch.device, bf16: bool, batch_size: int
) -> tuple[SegmentEncoder | None, str]:
    """``ranker.encoders.mert.MertEncoder`` on the saved weights, or None and why not."""
    try:
        from ranker.encoders.mert import MertEncoder
        from ranker.settings import ModelSettings
    except ImportError as exc:
        return None, f"ranker not importable ({exc})"
    settings = ModelSettings(
        mert_model=str(directory),
        offline=True,
        layers=list(LAYERS),
        device=str(device),
        precision="bf16" if bf16 else "fp32",
    )
    return MertEncoder(settings, offline=True, batch_size=batch_size), "ranker.encoders.mert.MertEncoder"


class OneClipBaseline:
    """Plain ``HubertModel`` (transformers' own loader), one clip per forward."""

    batch_size = 1

    def __init__(self, directory: Path, device: torch.device, bf16: bool) -> None:
        from transformers import HubertModel

        self.model = HubertModel.from_pretrained(directory).eval().to(device)
        self.device = device
        self.bf16 = bf16

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feats = [
            forward_pooled(self.model, torch.from_numpy(s)[None].to(self.device), self.bf16)[0].cpu().numpy()
            for s in segments
        ]
        frames = [int(self.model._get_feat_extract_output_lengths(len(s))) for s in segments]
        return np.stack(feats), np.asarray(frames, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float:
    """CPU seconds all cores have been busy since boot (Linux; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / _HZ


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float, float, float | None]:
    """(wall s, own CPU s, % of all cores used by other processes, peak GiB on CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    busy0, own0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    fn()
    synchronize(device)
    wall = time.perf_counter() - t0
    other = max(machine_busy_s() - busy0 - (time.process_time() - own0), 0.0)
    other_pct = 100 * other / ((os.cpu_count() or 1) * wall)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return wall, time.process_time() - own0, other_pct, peak


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Worst per-segment relative L2 error of ``a`` against reference ``b``."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.max(np.linalg.norm(a2 - b2, axis=1) / np.maximum(np.linalg.norm(b2, axis=1), 1e-12)))


def make_segments(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Music-like test clips: harmonic tones with a pulse and noise (the values do not affect speed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = []
    for i in range(n):
        f0 = 110.0 * 2 ** ((i % 12) / 12)
        y = sum(0.3 / h * np.sin(2 * np.pi * f0 * h * t + rng.random()) for h in range(1, 5))
        y = y * (0.6 + 0.4 * (np.sin(2 * np.pi * 2 * t) > 0)) + 0.02 * rng.standard_normal(len(t))
        out.append(np.asarray(y, dtype=np.float32))
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--standalone", action="store_true", help="never import ranker (the GPU-host path)")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--segment-s", type=float, help="segment length (default: 10 on CPU, 30 on CUDA)")
    p.add_argument("--segments", type=int, help="segments per timed call (default: 16 on CPU, 64 on CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="timed repeats of every configuration (best is kept)")
    p.add_argument("--fp32", action="store_true", help="on CUDA: no bf16 autocast")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-length (padded) check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    return p.parse_args(argv)


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextlib.contextmanager
def weights_dir(seed: int) -> Iterator[tuple[Path, int]]:
    with tempfile.TemporaryDirectory(prefix="mert95m-random-") as tmp:
        path = Path(tmp)
        yield path, save_random_mert(path, seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    bf16 = on_gpu and not args.fp32
    seg_s = args.segment_s or (30.0 if on_gpu else 10.0)
    n_seg = args.segments or (64 if on_gpu else 16)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    report: dict[str, Any] = {"machine": machine(device), "device": str(device), "bf16": bf16}
    report.update({"segment_s": seg_s, "segments_per_call": n_seg, "rounds": args.rounds})
    print(json.dumps(report))
    t_start = time.perf_counter()

    with weights_dir(args.seed) as (directory, n_params):
        report["parameters"] = n_params
        encoder: SegmentEncoder | None = None
        path = "standalone (--standalone)"
        if not args.standalone:
            encoder, path = project_encoder(directory, device, bf16, batch_sizes[0])
        if encoder is None:
            if not args.standalone:
                path = f"standalone: {path}"
            encoder = StandaloneEncoder(directory, device, bf16, batch_sizes[0])
        report["encoder_path"] = path
        baseline = OneClipBaseline(directory, device, bf16)
        print(f"MERT-v1-95M architecture, random weights, {n_params / 1e6:.1f} M parameters; encoder: {path}")

        segments = make_segments(n_seg, seg_s, args.seed)
        audio_s = n_seg * seg_s
        # Warm-up, untimed. On CUDA every batch shape gets its allocator blocks and cuDNN plans
        # before timing; on CPU one short forward per model is enough (no per-shape plans).
        if on_gpu:
            for b in batch_sizes:
                encoder.batch_size = b
                encoder.encode(segments[:b])
            baseline.encode(segments[:1])
        else:
            encoder.encode([segments[0][:SAMPLE_RATE]])
            baseline.encode([segments[0][:SAMPLE_RATE]])

        configs: list[tuple[str, int]] = [("one clip, plain HubertModel", 1)] + [
            ("encoder, batched", b) for b in batch_sizes
        ]
        results: dict[str, dict[str, Any]] = {}
        outputs: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]  # alternate to spread drift in machine load
            for name, b in order:
                key = f"{name} b={b}"
                if name.startswith("one clip"):
                    run: SegmentEncoder = baseline
                else:
                    run = encoder
                    encoder.batch_size = b
                holder: dict[str, np.ndarray] = {}

                def call(run: SegmentEncoder = run, holder: dict[str, np.ndarray] = holder) -> None:
                    holder["out"] = run.encode(segments)[0]

                wall, cpu, other, peak = timed(device, call)
                outputs[key] = holder["out"]
                res = results.setdefault(key, {"name": name, "batch": b, "walls": [], "cpus": [], "other_pct": []})
                res["walls"].append(wall)
                res["cpus"].append(cpu)
                res["other_pct"].append(other)
                res["peak_gib"] = peak
                print(f"  round {r + 1} {key}: {audio_s / wall:,.1f} audio-s/s (other processes {other:.0f}%)")

        base_key = "one clip, plain HubertModel b=1"
        reference = outputs[base_key]
        base_rate = audio_s / min(results[base_key]["walls"])
        rows = []
        verdicts = []
        for key, res in results.items():
            best = min(res["walls"])
            res["best_round_other_pct"] = res["other_pct"][res["walls"].index(best)]
            rate = audio_s / best
            res.update(
                audio_s_per_s=rate,
                audio_s_per_cpu_s=audio_s / min(res["cpus"]),
                segments_per_s=n_seg / best,
                vs_baseline=rate / base_rate,
                max_rel_err_vs_baseline=rel_err(outputs[key], reference),
            )
            verdict = "-"
            if key != base_key and res["batch"] > 1:
                verdict = "PASS" if rate >= TOLERANCE * base_rate else "FAIL"
                verdicts.append(verdict)
            res["verdict"] = verdict
            rows.append(
                [
                    res["name"],
                    res["batch"],
                    rate,
                    n_seg / best,
                    res["audio_s_per_cpu_s"],
                    res["vs_baseline"],
                    res["max_rel_err_vs_baseline"],
                    res["best_round_other_pct"],
                    res["peak_gib"],
                    verdict,
                ]
            )
        title = (
            f"MERT-v1-95M forward on {device} ({'bf16 autocast' if bf16 else 'fp32'}), "
            f"{n_seg} segments of {seg_s:g} s per call, best of {args.rounds}"
        )
        headers = [
            "path",
            "batch",
            "audio-s/s",
            "seg/s",
            "audio-s/cpu-s",
            "x one-clip",
            "rel err",
            "other cpu% (best round)",
            "peak GiB",
            "batched >= one-clip",
        ]
        print("\n" + table(title, headers, rows))
        report["results"] = list(results.values())
        report["verdict"] = "FAIL" if "FAIL" in verdicts else "PASS"
        other = max(r["best_round_other_pct"] for r in results.values())
        report["max_other_pct"] = other
        note = f" (other processes used up to {other:.0f}% of the cores: contended, noisy)" if other > 25 else ""
        print(f"batching not slower per audio second (>= {TOLERANCE:.0%} of one-clip): {report['verdict']}{note}")

        if not args.no_mixed:
            report["mixed"] = mixed_lengths(encoder, baseline, device, seg_s, max(batch_sizes), args.seed)
        if on_gpu:
            report["bf16_vs_fp32"] = precision_error(encoder, baseline, segments[:4], bf16)

    report["total_s"] = time.perf_counter() - t_start
    print(f"total {report['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def mixed_lengths(
    encoder: SegmentEncoder, baseline: OneClipBaseline, device: torch.device, seg_s: float, batch: int, seed: int
) -> dict[str, Any]:
    """Songs as the worker segments them (full segments + a shorter tail), batched across songs."""
    rng = np.random.default_rng(seed + 1)
    songs = [seg_s * (2 + float(rng.uniform(0.1, 0.9))) for _ in range(max(2, batch // 4))]  # 2 segments + a tail
    segments: list[np.ndarray] = []
    for i, length in enumerate(songs):
        (wave,) = make_segments(1, length, seed + 10 + i)
        step = round(seg_s * SAMPLE_RATE)
        segments += [wave[j : j + step] for j in range(0, len(wave), step)]
    encoder.batch_size = batch
    holder: dict[str, np.ndarray] = {}
    wall, _, other, _ = timed(device, lambda: holder.update(out=encoder.encode(segments)[0]))
    wall_b, _, other_b, _ = timed(device, lambda: holder.update(ref=baseline.encode(segments)[0]))
    audio = sum(len(s) for s in segments) / SAMPLE_RATE
    out = {
        "songs": len(songs),
        "segments": len(segments),
        "audio_s": audio,
        "batch": batch,
        "encoder_audio_s_per_s": audio / wall,
        "one_clip_audio_s_per_s": audio / wall_b,
        "max_rel_err_vs_one_clip": rel_err(holder["out"], holder["ref"]),
        "other_pct": max(other, other_b),
    }
    how = "tails batched apart" if isinstance(encoder, StandaloneEncoder) else "tails padded and masked"
    print(
        f"\nmixed lengths ({len(songs)} songs = {len(segments)} segments, {audio:.0f} audio s, {how}): "
        f"encoder batch {batch}: {out['encoder_audio_s_per_s']:,.1f} audio-s/s, one clip at a "
        f"time: {out['one_clip_audio_s_per_s']:,.1f}; worst relative error {out['max_rel_err_vs_one_clip']:.1e}"
    )
    return out


def precision_error(
    encoder: SegmentEncoder, baseline: OneClipBaseline, segments: Sequence[np.ndarray], bf16: bool
) -> dict[str, float]:
    """Relative error of the encoder's features (its precision) against fp32 on the same GPU and on CPU."""
    encoder.batch_size = len(segments)
    got = encoder.encode(segments)[0]
    baseline.bf16 = False
    fp32_gpu = baseline.encode(segments)[0]
    baseline.model.to("cpu")
    baseline.device = torch.device("cpu")
    fp32_cpu = baseline.encode(segments)[0]
    out = {
        "encoder_vs_fp32_gpu": rel_err(got, fp32_gpu),
        "encoder_vs_fp32_cpu": rel_err(got, fp32_cpu),
        "fp32_gpu_vs_fp32_cpu": rel_err(fp32_gpu, fp32_cpu),
    }
    label = "bf16" if bf16 else "fp32"
    print(
        f"encoder ({label}) vs fp32 on the GPU: {out['encoder_vs_fp32_gpu']:.1e}; vs fp32 on the CPU: "
        f"{out['encoder_vs_fp32_cpu']:.1e}; fp32 GPU vs CPU: {out['fp32_gpu_vs_fp32_cpu']:.1e}"
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
