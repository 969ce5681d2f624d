"""Load: N songs through the scoring worker (logmel, short clips), counts checked exactly.

Writes N short WAV clips, publishes N ``songs.generated`` events to a fresh topic on
the embedded stack, runs the worker until it is idle, and then checks that every song
is in the feed, the FAISS index and the embedding store exactly once and that
``songs.scored`` got a message per song. Prints throughput (first poll to last commit)
and the process's peak RSS.

    python benchmarks/load_worker.py --songs 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
from _common import git_state, print_figures, write_json
from kafka import KafkaConsumer

from consumers.publish import publish_events
from consumers.stack import EmbeddedStack, free_port
from consumers.worker import Worker
from indexes import open_score_store
from indexes.embedding_index import EmbeddingIndex
from ranker.events import SongGenerated
from ranker.settings import (
    IndexSettings,
    KafkaSettings,
    ModelSettings,
    RedisSettings,
    Settings,
    TopicSettings,
    WorkerSettings,
)


def clips(folder: Path, n: int, seconds: float, sr: int = 24_000) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(n):
        f = 110 * 2 ** (rng.integers(0, 36) / 12)
        y = 0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(4 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))
        path = folder / f"s{i:06d}.wav"
        sf.write(path, y.astype(np.float32), sr)
        paths.append(path)
    return paths


def count_topic(settings: Settings, topic: str, expect: int, timeout_s: float = 120) -> int:
    consumer = KafkaConsumer(
        topic,
        group_id=f"count-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=5000,
        **settings.kafka.client_kwargs(),
    )
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            seen.update(r.key for r in records)
    consumer.close()
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--songs", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--max-poll", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            state_dir=root / "state",
            dev_mode=True,  # the benchmark's songs are local files
            encoder="logmel",
            kafka=KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{free_port()}",
                topics=TopicSettings(
                    songs_generated=f"l{tag}.generated", songs_scored=f"l{tag}.scored", dead_letter=f"l{tag}.dl"
                ),
                worker_group_id=f"load-{tag}",
            ),
            redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=f"l{tag}"),
            index=IndexSettings(path=root / "index"),
            worker=WorkerSettings(max_poll_records=args.max_poll, encoder_batch_segments=64),
            model=ModelSettings(allow_untrained=True),  # plumbing: the seeded head will do
        )
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            audio = root / "audio"
            audio.mkdir()
            t0 = time.perf_counter()
            paths = clips(audio, args.songs, args.seconds)
            now = datetime.now(UTC)
            events = [
                SongGenerated(song_id=p.stem, audio_uri=p.as_uri(), generator="load-test", created_at=now)
                for p in paths
            ]
            publish_events(settings, events)
            prep_s = time.perf_counter() - t0
            worker = Worker(settings)
            started = time.perf_counter()
            stats = worker.run(until_idle_s=5.0)
            wall_s = time.perf_counter() - started - 5.0
            store = open_score_store(settings.redis.url.get_secret_value(), settings.redis.key_prefix, 10.0)
            feed_size = store.feed_size(settings.feed.name)
            store.close()
            with EmbeddingIndex(settings.index_dir, dim=worker.encoder.vector_dim, use_gpu="never") as idx:
                keys = idx.vector_index.keys()
                index_unique, stored = len(set(keys.tolist())), idx.store.count()
                index_total = len(keys)
            scored_msgs = count_topic(settings, settings.kafka.topics.songs_scored, args.songs)
        finally:
            stack.down()
    exact = feed_size == index_total == index_unique == stored == scored_msgs == stats.scored == args.songs
    figures = {
        "songs": args.songs,
        "clip_seconds": args.seconds,
        "scored": stats.scored,
        "dead_letters": stats.dead_letters,
        "feed_entries": feed_size,
        "index_vectors": index_total,
        "store_rows": stored,
        "songs_scored_messages": scored_msgs,
        "counts_exact": exact,
        "songs_per_s_incl_group_join": round(stats.scored / wall_s, 1),
        "prepare_s": round(prep_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{os.cpu_count()} cores",
        "commit": git_state(),
    }
    print_figures(figures)
    if args.json:
        write_json(figures, args.json)
    if not exact:
        raise SystemExit("counts do not match")


if __name__ == "__main__":
    main()
