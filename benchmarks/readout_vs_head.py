"""How well a retrain's likes model ranks new songs, learned from a few dozen played songs (synthetic).

The loop simulation's songs (``consumers.loop_world``: its world, its history-trained initial
head, its listeners) are embedded with the log-mel baseline. The first ``--train`` songs get plays
(Poisson around ``--plays``) and likes drawn from the listeners' like rate; the rest are the new
songs. Printed per seed: Spearman of each model's likes output with the listeners' like rate on the
new songs, for the history-trained head, that head fine-tuned warm on the played songs (the retrain
recipe: exposure targets, 20 epochs, learning rate 1e-4, batch 512) and the like-rate read-out
(``ranker.model.readout``). An accuracy figure, not a speed one; docs/model.md quotes it.

    .venv/bin/python benchmarks/readout_vs_head.py --seeds 1 2 3 --audience listeners
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from consumers.loop_world import LoopConfig, _build_world, _pretrain_head, audience_like_rates
from ranker.embed import embed_catalog
from ranker.features import load_features
from ranker.model.readout import fit_like_readout
from ranker.model.retrain import Observed, _median, smoothed_like_rates, training_catalog
from ranker.model.train import train_head
from ranker.model.train_config import TrainConfig
from ranker.settings import ModelSettings, Settings


def run(seed: int, songs: int, train: int, plays_mean: float, audience: str, out: Path) -> dict[str, float]:
    cfg = LoopConfig() if audience == "listeners" else LoopConfig(audience_weights=None)
    settings = Settings(model=ModelSettings(logmel_n_mels=96), state_dir=out / "state", encoder="logmel")
    world = _build_world(songs=songs, users=300, hours=10, seed=seed, out_dir=out, cfg=cfg)
    truth = audience_like_rates(world, cfg)
    head = _pretrain_head(settings.model_copy(update={"state_dir": out / "pre"}), seed=seed, out_dir=out, cfg=cfg)
    ids = [s.song_id for s in world.songs]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    created = [t0 + timedelta(minutes=i) for i in range(songs)]
    catalog = out / "catalog.parquet"
    pq.write_table(
        pa.table(
            {
                "song_id": ids,
                "audio_uri": [s.path.as_uri() for s in world.songs],
                "generator": [s.generator for s in world.songs],
                "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
            }
        ),
        catalog,
    )
    embed_catalog(catalog, out / "features", settings, progress=False)
    features = load_features(out / "features", ids)
    rate = np.array([truth[i] for i in ids])
    rng = np.random.default_rng(seed + 5)
    plays = rng.poisson(plays_mean, size=train) + 1
    likes = rng.binomial(plays, rate[:train])
    new = slice(train, songs)
    likes_col = list(head.tasks).index("likes")

    def spearman(scores: np.ndarray) -> float:
        return float(spearmanr(scores, rate[new]).statistic)

    observed = Observed(ids[:train], plays, likes, [s.generator for s in world.songs[:train]], created[:train])
    seen = load_features(out / "features", ids[:train])
    adjusted = smoothed_like_rates(plays, likes, 20.0) * _median(plays)
    cat = training_catalog(observed, np.arange(train), head.predict(seen.layers), head.tasks, likes=adjusted)
    tuned = train_head(seen, cat, TrainConfig(epochs=20, patience=20, seed=seed), init=head).model
    readout = fit_like_readout(seen.layers.reshape(train, -1), plays, likes)
    return {
        "history_head": spearman(head.predict(features.layers[new])[:, likes_col]),
        "fine_tuned_head": spearman(tuned.predict(features.layers[new])[:, likes_col]),
        "readout": spearman(readout.logits(features.layers[new].reshape(songs - train, -1))),
        "readout_l2": readout.l2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--songs", type=int, default=400)
    ap.add_argument("--train", type=int, default=80)
    ap.add_argument("--plays", type=float, default=10.0)
    ap.add_argument("--audience", choices=["listeners", "history"], default="listeners")
    args = ap.parse_args()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="readout-bench") as tmp:
            res = run(seed, args.songs, args.train, args.plays, args.audience, Path(tmp))
        print(json.dumps({"seed": seed, "audience": args.audience, "train": args.train, **res}))


if __name__ == "__main__":
    main()
