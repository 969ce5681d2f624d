"""Retraining wall time for N songs with cached embeddings, on the embedded stack.

Fills the worker's embedding store with N songs' pooled layers (4 x ``--dim`` float32, the
shape MERT-95M gives at 768; synthetic, with a hidden appeal linear in the features), writes
their metadata and scores to Redis through the worker's own writer and their plays and likes
to the Parquet engagement log, then times one ``apexrank retrain`` run
(:func:`consumers.retrain.run_once`): gather (log + Redis + embedding store), train the
candidate, evaluate both heads on the holdout, promote, rescore the cold-start window,
publish ``models.promoted``. No audio is decoded. Prints a table; ``--json`` writes it.

    python benchmarks/retrain_time.py --songs 100000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from _common import git_state, print_figures, write_json

from consumers.retrain import STORE_FILE, run_once
from consumers.stack import EmbeddedStack, free_port
from indexes.base import EmbeddingRecord, SongRecord
from indexes.engagement_log import EngagementLog, LoggedEvent
from indexes.sqlite_embeddings import SqliteEmbeddingStore
from ranker import stores
from ranker.encoders import build_encoder
from ranker.events import TASKS
from ranker.serving.writer import write_scored
from ranker.settings import (
    KafkaSettings,
    ModelSettings,
    RedisSettings,
    RetrainSettings,
    Settings,
    TopicSettings,
)

CHUNK = 5000


def build_settings(state: Path, dim: int, epochs: int) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        state_dir=state,
        encoder="logmel",  # a weightless encoder id of the wanted width; the layers are synthetic anyway
        model=ModelSettings(logmel_n_mels=dim),
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}",
            topics=TopicSettings(engagement=f"r{tag}.engagement", models_promoted=f"r{tag}.models.promoted"),
        ),
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=f"r{tag}"),
        retrain=RetrainSettings(epochs=epochs, margin=0.0, rescore_grace_s=0.0),  # no worker runs beside it
    )


def populate(settings: Settings, n: int, dim: int, window_share: float, seed: int) -> dict[str, float]:
    """The embedding store, Redis songs and the engagement log for ``n`` songs; returns set-up times."""
    rng = np.random.default_rng(seed)
    encoder_id = build_encoder(settings).encoder_id
    direction = rng.normal(size=(4, dim)).astype(np.float32) / np.sqrt(4 * dim)
    now = datetime.now(UTC)
    horizon_h = settings.retrain.cold_start_window_h
    store = stores.score_store(settings)
    log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    times = {"embeddings": 0.0, "redis": 0.0, "engagement_log": 0.0}
    offset = 0
    events = 0
    with SqliteEmbeddingStore(settings.index_dir / STORE_FILE) as emb:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            layers = rng.normal(size=(m, 4, dim)).astype(np.float32)
            appeal = (layers * direction).sum(axis=(1, 2)) + rng.normal(0, 0.5, m)
            ids = [f"bench-{start + i:07d}" for i in range(m)]
            t0 = time.perf_counter()
            emb.put_many(
                [
                    EmbeddingRecord(
                        song_id=ids[i],
                        encoder_id=encoder_id,
                        layers=layers[i],
                        vector=layers[i].mean(axis=0) / np.linalg.norm(layers[i].mean(axis=0)),
                        n_segments=6,
                        n_frames=13_500,
                    )
                    for i in range(m)
                ]
            )
            t1 = time.perf_counter()
            # A share of the songs is young enough to be rescored on promotion.
            young = rng.random(m) < window_share
            age_h = np.where(young, rng.uniform(0, horizon_h * 0.9, m), rng.uniform(horizon_h * 1.1, 30 * 24, m))
            created = [(now - timedelta(hours=float(a))).isoformat() for a in age_h]
            write_scored(
                store,
                settings,
                [
                    SongRecord(
                        song_id=ids[i],
                        model_version="bench",
                        scores=dict.fromkeys(TASKS, 3.0) | {"streams": 50.0, "likes": 50.0},
                        rank_score=0.5,
                        generator=f"gen-{i % 4}",
                        created_at=created[i],
                        scored_at=now.isoformat(),
                    )
                    for i in range(m)
                ],
            )
            t2 = time.perf_counter()
            plays = rng.integers(20, 60, m)
            like_p = 1 / (1 + np.exp(-(-2.5 + appeal)))
            likes = rng.binomial(plays, like_p)
            rows = []
            for i in range(m):
                for k in range(int(plays[i])):
                    kind = "like" if k < likes[i] else "play"
                    for t in ("play", "like") if kind == "like" else ("play",):
                        rows.append(
                            LoggedEvent(
                                event_id=f"{ids[i]}-{k}-{t}",
                                song_id=ids[i],
                                user_id=f"u{k}",
                                type=t,
                                ts=now,
                                feed=None,
                                position=None,
                                partition=0,
                                offset=offset,
                            )
                        )
                        offset += 1
            log.append(rows)
            events += len(rows)
            times["embeddings"] += t1 - t0
            times["redis"] += t2 - t1
            times["engagement_log"] += time.perf_counter() - t2
    store.close()
    times["events"] = events
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--songs", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768, help="feature width per layer (768: MERT-95M)")
    ap.add_argument("--epochs", type=int, default=30, help="retrain.epochs (the default setting is 30)")
    ap.add_argument("--window-share", type=float, default=0.1, help="share of songs inside the cold-start window")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = build_settings(Path(tmp), args.dim, args.epochs)
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            setup = populate(settings, args.songs, args.dim, args.window_share, args.seed)
            started = time.perf_counter()
            report = run_once(settings)
            wall = time.perf_counter() - started
        finally:
            stack.down()
    figures: dict[str, object] = {
        "songs": args.songs,
        "features_per_song": f"4 x {args.dim} float32",
        "engagement_events": int(setup["events"]),
        "train_songs / holdout songs": f"{report.n_train} / {report.n_holdout}",
        "epochs (retrain.epochs)": args.epochs,
        "promoted": report.promoted,
        **{f"{step} s": v for step, v in report.timings_s.items()},
        "retrain wall time s": round(wall, 1),
        "set-up s (not timed above)": {k: round(v, 1) for k, v in setup.items() if k != "events"},
        "peak RSS MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "commit": git_state(),
    }
    print_figures(figures)
    print("report:", report.reason)
    if args.json:
        write_json(figures, args.json)


if __name__ == "__main__":
    main()
