"""MERT-v1-95M on one GPU: every speed option of the worker's encoder, in one timed run (issue 18).

One prepared script for a short GPU lease: it needs only torch, transformers and numpy
(plus this checkout, which travels with the command). It imports the worker's own encoder,
``ranker.encoders.mert.MertEncoder``, whose modules need nothing else (its settings are
passed as a plain namespace, so pydantic is not needed), and ``_common``/``mert_forward``
from this folder (standard library, numpy, torch).

The model is the full MERT-v1-95M architecture with random weights (no weights and no
network on the device host): speed does not depend on the values. The bf16-vs-fp32
agreement on random weights is a proxy for the trained model's.

In one run, under a global time budget (``--budget-s``; what is left when it runs out is
recorded as skipped and ``complete`` is false; the JSON is rewritten after every case, so
a kill keeps the rest):

* the plain single-clip forward (transformers' ``HubertModel``, fp32) and the encoder's
  default path (bf16 autocast, sdpa) at batch 1;
* each option alone at ``--ref-batch`` (32) against that default, and all combined;
* batch sizes 1, 8, 32, 64, 128 for the default and the best uncompiled combination;
* realistic mixed lengths: 2-4 minute songs cut into 30 s segments (full ones plus a
  tail), batched in arrival order, sorted longest first (today), and bucketed;
* bf16 (autocast and end to end) against fp32 on the same GPU: minimum cosine over a set
  of songs, raw and with the songs' common part taken out;
* last, ``torch.compile``: dynamic, static, static with bf16 and pinned buffers, the same
  with CUDA graphs, and mixed lengths bucketed with dynamic compile.

Each case reports segments/s, audio-s/s, peak GPU memory and the fraction of the FLOP
limit (FLOPs per audio second counted from the config: about 27 G for MERT-95M on 30 s
segments; peak from a small table by device name, ``--peak-tflops`` overrides).

Device (one command, about 8 minutes; see docs/benchmarks.md)::

    PYTHONUNBUFFERED=1 timeout -k 10 560 python3 benchmarks/mert_device.py --device cuda --budget-s 480 \
        --out $OUT/mert-device.json 2>&1 | tee $OUT/mert-device.log

CPU check of the script itself (tiny config, seconds)::

    .venv/bin/python benchmarks/mert_device.py --device cpu --config tiny --no-compile --out /tmp/mert-device.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _common, mert_forward; the checkout's ranker

from _common import git_state, loadavg, table  # noqa: E402
from mert_forward import MERT_95M, make_segments, save_random_mert  # noqa: E402

from ranker.encoders import mert as mert_module  # noqa: E402
from ranker.encoders.mert import MertEncoder  # noqa: E402

SAMPLE_RATE = 24_000
LAYERS = [2, 5, 8, 12]  # the worker's default; tiny: every hidden state

#: A tiny MERT-shaped config: the CPU test of this script.
TINY: dict[str, Any] = {
    **MERT_95M,
    "conv_dim": [16] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}

#: Dense bf16 peak by device name (the issue's figure for both Hopper parts: about 790
#: TFLOP/s; NVIDIA's datasheets give 989 for SXM and 756 for the H100 PCIe).
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0}

DEFAULT_OPTIONS: dict[str, Any] = {
    "precision": "auto",
    "attn_implementation": "sdpa",
    "half_weights": False,
    "bucket_s": [],
    "compile": "off",
    "pin_memory": False,
}


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


class OutOfTime(Exception):
    """The global budget ran out (SIGALRM)."""


class Budget:
    """A deadline for the whole run; SIGALRM interrupts a case that runs past it."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))

    @staticmethod
    def _alarm(signum: int, frame: FrameType | None) -> None:
        raise OutOfTime

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stop(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


# --------------------------------------------------------------------------------------
# Model, FLOPs, timing
# --------------------------------------------------------------------------------------


def conv_frames(config: dict[str, Any], n_samples: int) -> list[int]:
    out, n = [], n_samples
    for k, s in zip(config["conv_kernel"], config["conv_stride"], strict=True):
        n = (n - k) // s + 1
        out.append(n)
    return out


def flops_per_audio_s(config: dict[str, Any], segment_s: float) -> float:
    """Forward FLOPs (2 per multiply-add) per audio second for segments of ``segment_s``."""
    frames = conv_frames(config, round(segment_s * SAMPLE_RATE))
    dims = [1, *config["conv_dim"]]
    conv = sum(2 * dims[i] * dims[i + 1] * k * frames[i] for i, k in enumerate(config["conv_kernel"]))
    t, h, inter, n_layers = frames[-1], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    proj = 2 * config["conv_dim"][-1] * h * t
    pos = 2 * h * (h // config["num_conv_pos_embedding_groups"]) * config["num_conv_pos_embeddings"] * t
    per_layer = 2 * t * (4 * h * h + 2 * h * inter) + 4 * t * t * h  # projections, MLP, QK^T and AV
    return (conv + proj + pos + n_layers * per_layer) / segment_s


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for the CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"table: {key} {tflops:g} TFLOP/s dense bf16"
    return None, f"{name} not in the table (use --peak-tflops)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layers_of(config: dict[str, Any]) -> list[int]:
    n = int(config["num_hidden_layers"])
    return LAYERS if n >= max(LAYERS) else list(range(n + 1))


def encoder(directory: Path, device: torch.device, batch: int, **options: Any) -> MertEncoder:
    """The worker's encoder with ``options`` over the defaults (duck-typed settings: no pydantic)."""
    config = json.loads((directory / "config.json").read_text())
    settings = SimpleNamespace(
        mert_model=str(directory), layers=layers_of(config), device=str(device), **{**DEFAULT_OPTIONS, **options}
    )
    return MertEncoder(settings, offline=True, batch_size=batch)  # type: ignore[arg-type]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.asarray(np.sum(a2 * b2, axis=1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, device: torch.device, config: dict[str, Any]) -> None:
        self.args = args
        self.device = device
        self.config = config
        self.budget = Budget(args.budget_s)
        self.seg_s = args.segment_s
        self.flops_s = flops_per_audio_s(config, self.seg_s)
        self.peak, peak_source = peak_flops(device, args.peak_tflops)
        self.report: dict[str, Any] = {
            "script": "benchmarks/mert_device.py",
            "commit": git_state(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "loadavg_start": loadavg(),
            "config": args.config,
            "weights": "random (speed does not depend on them; agreement on random weights is a proxy)",
            "segment_s": self.seg_s,
            "gflop_per_audio_s": self.flops_s / 1e9,
            "peak_flops": self.peak,
            "peak_flops_source": peak_source,
            "budget_s": args.budget_s,
            "cases": {},
            "skipped": [],
        }
        self._clips: list[np.ndarray] = []

    def save(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.budget.start
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.args.out)

    @contextlib.contextmanager
    def case(self, name: str, min_left_s: float = 0.0) -> Iterator[dict[str, Any] | None]:
        """Runs one case; out of time (before or during), records it as skipped."""
        if self.args.only and not any(part in name for part in self.args.only):
            yield None  # not selected (--only)
            return
        if self.budget.left() < min_left_s:
            self.report["skipped"].append(name)
            print(f"{name}: skipped (budget)", flush=True)
            yield None
            return
        result: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield result
        except OutOfTime:  # the cases after it see no time left and are skipped
            result.clear()  # a half-measured case is no figure
            self.report["skipped"].append(name)
            self.report["out_of_time_in"] = name
            print(f"{name}: out of time", flush=True)
        except torch.cuda.OutOfMemoryError as exc:
            result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        except Exception as exc:  # one case's failure must not lose the others
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
        finally:
            if result:
                result["case_s"] = time.perf_counter() - t0  # setup, warm-up (compilation) and timed calls
                self.report["cases"][name] = result
                print(f"{name}: {json.dumps(result, default=str)}", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()

    def time_calls(self, fn: Callable[[], Any], segments: Sequence[np.ndarray], warmups: int = 1) -> dict[str, Any]:
        """Warm up, then best of ``--rounds`` timed calls of ``fn`` (which encodes ``segments``)."""
        for _ in range(warmups):
            fn()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        walls = []
        for _ in range(self.args.rounds):
            sync(self.device)
            t0 = time.perf_counter()
            fn()
            sync(self.device)
            walls.append(time.perf_counter() - t0)
        best = min(walls)
        audio = sum(len(s) for s in segments) / SAMPLE_RATE
        rate = audio / best
        out = {
            "segments": len(segments),
            "audio_s": audio,
            "walls_s": walls,
            "segments_per_s": len(segments) / best,
            "audio_s_per_s": rate,
            "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
            "flop_fraction": rate * self.flops_s / self.peak if self.peak else None,
        }
        return out

    def segments_for(self, batch: int) -> list[np.ndarray]:
        """Equal-length test clips, at least two batches' worth (made once: 30 s clips take a while)."""
        n = max(self.args.min_segments, 2 * batch)
        if len(self._clips) < n:  # once, for the largest batch of the run
            most = max(n, 2 * max(self.args.batch_sizes), 2 * self.args.ref_batch)
            self._clips = make_segments(most, self.seg_s, self.args.seed)
        return self._clips[:n]


def plain_single_clip(directory: Path, device: torch.device) -> Callable[[Sequence[np.ndarray]], None]:
    """transformers' HubertModel, fp32, one clip per forward (normalised, hidden states, mean-pooled)."""
    from mert_forward import normalise
    from transformers import HubertModel

    model = HubertModel.from_pretrained(directory).eval().to(device)
    layers = layers_of(model.config.to_dict())

    @torch.inference_mode()
    def run(segments: Sequence[np.ndarray]) -> None:
        for s in segments:
            out = model(normalise(torch.from_numpy(s)[None].to(device)), output_hidden_states=True)
            torch.stack([out.hidden_states[i].mean(1) for i in layers], dim=1).cpu()

    return run


def songs(n: int, seg_s: float, seed: int) -> list[list[np.ndarray]]:
    """``n`` songs of 4-8 segments' length (2-4 minutes at 30 s), cut into segments plus a tail."""
    rng = np.random.default_rng(seed + 7)
    out = []
    for k in range(n):
        (wave,) = make_segments(1, seg_s * float(rng.uniform(4.0, 8.0)), seed + 100 + k)
        step = round(seg_s * SAMPLE_RATE)
        out.append([wave[i : i + step] for i in range(0, len(wave), step)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    mert_module.COMPILE_BACKEND = args.compile_backend
    config = TINY if args.config == "tiny" else MERT_95M
    run = Run(args, device, config)
    with tempfile.TemporaryDirectory(prefix="mert-device-") as tmp:
        directory = Path(tmp) / ("mert-tiny" if args.config == "tiny" else "mert-95m")
        try:
            run.report["parameters"] = save_random_mert(directory, args.seed, config)
            cases(run, directory)
        except OutOfTime:  # outside a case: building the model, or making test audio
            run.report.setdefault("out_of_time_in", "setup")
        finally:
            run.budget.stop()
            run.report["complete"] = not run.report["skipped"] and "out_of_time_in" not in run.report
            run.save()
    summary(run)
    print(f"wrote {args.out}")
    return 0


def cases(run: Run, d: Path) -> None:
    """Every case, most valuable first, so a short budget keeps what matters most."""
    dev, seg_s, ref_b = run.device, run.seg_s, run.args.ref_batch
    quick = run.args.config == "tiny"
    best_plain = {"half_weights": True, "pin_memory": True}
    buckets = [seg_s / 3, 2 * seg_s / 3, seg_s]

    def encode_case(name: str, batch: int, warmups: int = 1, **options: Any) -> None:
        with run.case(name) as res:
            if res is None:
                return
            if options.get("compile", "off") != "off":
                torch._dynamo.reset()  # compiled models share HubertModel's code: fresh recompile limit
            enc = encoder(d, dev, batch, **options)
            segs = run.segments_for(batch)
            res.update(batch=batch, options=options, attn=enc.attn_implementation)
            res.update(run.time_calls(lambda: enc.encode(segs), segs, warmups))

    # 1. The plain single-clip forward, and the encoder's default at batch 1.
    with run.case("plain HubertModel fp32, one clip") as res:
        if res is not None:
            forward = plain_single_clip(d, dev)
            segs = run.segments_for(1)[:4]
            res.update(batch=1, **run.time_calls(lambda: forward(segs), segs))
    encode_case("encoder default, b=1", 1)
    # 2. Each option alone at the reference batch, then all combined.
    encode_case(f"encoder default, b={ref_b}", ref_b)
    alone: list[tuple[str, dict[str, Any]]] = [
        ("attn eager", {"attn_implementation": "eager"}),
        ("flash_attention_2", {"attn_implementation": "flash_attention_2"}),
        ("bf16 end to end", {"half_weights": True}),
        ("pinned host buffers", {"pin_memory": True}),
        ("bf16 end to end + pinned", best_plain),
    ]
    for label, opts in alone:
        encode_case(f"{label}, b={ref_b}", ref_b, **opts)
    # 3. Batch sizes, the default and the best uncompiled combination.
    for b in run.args.batch_sizes:
        if b != ref_b:
            encode_case(f"bf16 end to end + pinned, b={b}", b, **best_plain)
    for b in run.args.batch_sizes:
        if b not in (1, ref_b):
            encode_case(f"encoder default, b={b}", b)
    # 4. Realistic mixed lengths: arrival order, sorted (today), bucketed.
    song_set = songs(run.args.songs, seg_s, run.args.seed)
    flat = [s for song in song_set for s in song]
    mixed: list[tuple[str, dict[str, Any], bool]] = [
        ("mixed, arrival order, default", {}, True),
        ("mixed, sorted (today), default", {}, False),
        ("mixed, sorted, bf16 end to end + pinned", best_plain, False),
        ("mixed, bucketed, bf16 end to end + pinned", {**best_plain, "bucket_s": buckets}, False),
    ]
    for label, opts, arrival in mixed:
        with run.case(label) as res:
            if res is None:
                continue
            enc = encoder(d, dev, ref_b, **opts)
            chunks = [flat[i : i + ref_b] for i in range(0, len(flat), ref_b)] if arrival else [flat]
            res.update(batch=ref_b, options=opts, songs=len(song_set), arrival_order=arrival)

            def each(enc: MertEncoder = enc, chunks: list[list[np.ndarray]] = chunks) -> None:
                for c in chunks:  # arrival order: one encode call per batch, padded to its longest
                    enc.encode(c)

            res.update(run.time_calls(each, flat))
    # 5. Agreement: bf16 (autocast, end to end) against fp32 on this device.
    agreement(run, d, song_set[: run.args.agree_songs])
    # 6. torch.compile (minutes of compilation on a GPU; last, so the rest is safe).
    if run.args.no_compile:
        return
    warm = 3  # the first calls compile (and transformers installs its output hooks)
    encode_case(f"compile dynamic, b={ref_b}", ref_b, warm, compile="dynamic")
    encode_case(f"compile static, b={ref_b}", ref_b, warm, compile="static")
    encode_case(
        f"all combined (bf16 e2e, pinned, compile static), b={ref_b}", ref_b, warm, compile="static", **best_plain
    )
    label = f"all combined (bf16 e2e, pinned, compile static + CUDA graphs), b={ref_b}"
    encode_case(label, ref_b, warm, compile="cudagraphs", **best_plain)
    if not quick or run.args.compile_mixed:
        with run.case("mixed, all combined (bucketed, compile dynamic)") as res:
            if res is not None:
                opts = {**best_plain, "bucket_s": buckets, "compile": "dynamic"}
                torch._dynamo.reset()
                enc = encoder(d, dev, ref_b, **opts)
                res.update(batch=ref_b, options=opts, songs=len(song_set))
                res.update(run.time_calls(lambda: enc.encode(flat), flat, warm))


def agreement(run: Run, d: Path, song_set: list[list[np.ndarray]]) -> None:
    from ranker.encoders import pool_song

    with run.case("agreement bf16 vs fp32") as res:
        if res is None:
            return
        flat = [s for song in song_set for s in song]

        def embed(**options: Any) -> np.ndarray:
            enc = encoder(d, run.device, run.args.ref_batch, **options)
            feats, frames = enc.encode(flat)
            out, start = [], 0
            for song in song_set:
                out.append(pool_song(feats[start : start + len(song)], frames[start : start + len(song)]))
                start += len(song)
            del enc
            return np.stack(out)

        ref = embed(precision="fp32")
        centre = ref.mean(axis=0, keepdims=True)
        res.update(songs=len(song_set), segments=len(flat), weights="random: a proxy for the trained model")
        half = "bf16" if run.device.type == "cpu" else "auto"  # the CPU runs bf16 only when named
        variants: list[tuple[str, dict[str, Any]]] = [("bf16 end to end", {"precision": half, "half_weights": True})]
        if run.device.type == "cuda":
            variants.insert(0, ("bf16 autocast", {}))
        for label, opts in variants:
            got = embed(**opts)
            res[label] = {
                "min_cosine": float(cosines(got, ref).min()),
                "min_cosine_centred": float(cosines(got - centre, ref - centre).min()),
                "passes_0_999": bool(cosines(got, ref).min() >= 0.999),
            }


def summary(run: Run) -> None:
    rows = []
    for name, r in run.report["cases"].items():
        if "audio_s_per_s" in r:
            frac = r.get("flop_fraction")
            rows.append(
                [name, r["segments_per_s"], r["audio_s_per_s"], r["peak_gib"], None if frac is None else 100 * frac]
            )
        elif "error" in r:
            rows.append([name, None, None, None, r["error"][:60]])
    print(
        "\n" + table(f"MERT on {run.report['device_name']}", ["case", "seg/s", "audio-s/s", "peak GiB", "% FLOP"], rows)
    )
    agree = run.report["cases"].get("agreement bf16 vs fp32", {})
    for label in ("bf16 autocast", "bf16 end to end"):
        if label in agree:
            a = agree[label]
            print(f"{label} vs fp32: min cosine {a['min_cosine']:.6f}, centred {a['min_cosine_centred']:.6f}")
    if run.report["skipped"]:
        print("skipped (budget): " + ", ".join(run.report["skipped"]))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["95m", "tiny"], default="95m", help="tiny: the CPU test of this script")
    p.add_argument("--budget-s", type=float, default=480.0, help="whole run; what is left is skipped")
    p.add_argument("--segment-s", type=float, help="segment length (default 30; tiny: 1)")
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32, 64, 128])
    p.add_argument("--ref-batch", type=int, default=32, help="batch of the option-by-option comparison")
    p.add_argument("--min-segments", type=int, help="segments per timed call at least (default 64; tiny: 4)")
    p.add_argument("--rounds", type=int, help="timed calls per case, best kept (default 2; tiny: 1)")
    p.add_argument("--songs", type=int, help="mixed-length songs (default 48; tiny: 3)")
    p.add_argument("--agree-songs", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the device is not in the table")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager: trace only (the CPU test)")
    p.add_argument("--compile-mixed", action="store_true", help="tiny: also the compiled mixed-length case")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile cases")
    p.add_argument(
        "--only", type=lambda s: [part for part in s.split(",") if part], help="run only cases whose names contain one"
    )
    p.add_argument("--seed", type=int, default=0)
    default_out = Path(os.environ["OUT"]) / "mert-device.json" if os.environ.get("OUT") else Path("mert-device.json")
    p.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args(argv)
    tiny = args.config == "tiny"
    args.segment_s = args.segment_s or (1.0 if tiny else 30.0)
    args.min_segments = args.min_segments or (4 if tiny else 64)
    args.rounds = args.rounds or (1 if tiny else 2)
    args.songs = args.songs or (3 if tiny else 48)
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


if __name__ == "__main__":
    sys.exit(main())
