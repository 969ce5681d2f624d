"""Redis memory per scored song: one song hash plus one entry in each of N feeds.

Writes N synthetic song records through the real score store into a fresh
embedded Redis and reads ``used_memory`` before and after. Prints bytes per song.

    python benchmarks/redis_memory.py --songs 100000 --feeds 1
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis

from consumers.stack import EmbeddedStack, free_port
from indexes.base import SongRecord
from ranker import stores
from ranker.events import POPULARITY_TASKS, TASKS
from ranker.settings import KafkaSettings, RedisSettings, Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--songs", type=int, default=100_000)
    ap.add_argument("--feeds", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            state_dir=Path(tmp),
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
            redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"),  # type: ignore[arg-type]
        )
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            url = settings.redis.url.get_secret_value()
            client = redis.Redis.from_url(url)
            before = int(client.info("memory")["used_memory"])
            store = stores.score_store(settings)  # key prefix "apexrank", the default
            now = datetime.now(UTC).isoformat()
            batch: list[SongRecord] = []
            for i in range(args.songs):
                scores = {t: float(rng.uniform(0, 100) if t in POPULARITY_TASKS else rng.uniform(1, 5)) for t in TASKS}
                batch.append(
                    SongRecord(
                        song_id=f"suno-{i:012d}",
                        model_version="apex-0123456789ab",
                        scores=scores,
                        rank_score=float(rng.uniform()),
                        generator="suno-v5",
                        created_at=now,
                        scored_at=now,
                        extra={"n_segments": 6, "duration_s": 183.2, "truncated": 0},
                    )
                )
                if len(batch) == 1000:
                    for f in range(args.feeds):
                        store.write_songs(batch, f"feed-{f}")
                    batch = []
            if batch:
                for f in range(args.feeds):
                    store.write_songs(batch, f"feed-{f}")
            after = int(client.info("memory")["used_memory"])
            server = client.info("server")["redis_version"]
            store.close()
        finally:
            stack.down()
    per_song = (after - before) / args.songs
    print(f"redis {server}: {args.songs} songs, {args.feeds} feed(s): {per_song:.0f} bytes/song")
    print(f"=> {per_song * 1e6 / 2**30:.2f} GiB per million songs")


if __name__ == "__main__":
    main()
