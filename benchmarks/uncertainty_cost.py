"""What issue 17's uncertainty costs the scoring path, per song: the OOD distance, and K heads instead of one.

MERT-sized inputs (4 layers x 768), a worker-sized batch (64 songs), the default head shape,
seeded heads (their weights do not change the cost) and an OOD model fitted on 2,000 clustered
vectors. Prints microseconds per song for ``predict`` (one head), the OOD score alone, and
``predict_full`` with one head + OOD and with an ensemble of K + OOD. Run under ``nice``:

    nice -n 10 .venv/bin/python benchmarks/uncertainty_cost.py [--k 5] [--batch 64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from ranker.model.artifact import ScoringModel
from ranker.model.head import ApexHead, HeadConfig
from ranker.model.ood import fit_ood

N_LAYERS, DIM = 4, 768


def per_song_us(fn: Callable[[], object], n_songs: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / n_songs


def model(k: int, ood: object) -> ScoringModel:
    config = HeadConfig(input_dim=DIM, n_layers=N_LAYERS, input_norm=True)
    heads = []
    for seed in range(k):
        torch.manual_seed(seed)
        heads.append(ApexHead(config))
    return ScoringModel.from_head(
        heads, encoder_id="bench", training={"note": "benchmark"}, ood=ood, ood_info={"method": "bench"}
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, N_LAYERS, DIM))
    train = (centres[rng.integers(0, 8, 2000)] + 0.3 * rng.normal(size=(2000, N_LAYERS, DIM))).astype(np.float32)
    t0 = time.perf_counter()
    ood = fit_ood(train)
    fit_s = time.perf_counter() - t0
    x = train[: args.batch]
    single, ensemble = model(1, ood), model(args.k, ood)
    rows = {
        "predict, one head": per_song_us(lambda: single.predict(x), args.batch, args.repeats),
        "OOD score alone": per_song_us(lambda: ood.score(x), args.batch, args.repeats),
        "predict_full, one head + OOD": per_song_us(lambda: single.predict_full(x), args.batch, args.repeats),
        f"predict_full, {args.k} heads + OOD": per_song_us(lambda: ensemble.predict_full(x), args.batch, args.repeats),
    }
    print(f"OOD fit on 2,000 songs of {N_LAYERS}x{DIM}: {fit_s:.2f} s, {ood.components.shape[1]} components")
    for name, us in rows.items():
        print(f"{name:36s} {us:8.1f} us/song (batch {args.batch}, best of {args.repeats})")


if __name__ == "__main__":
    main()
