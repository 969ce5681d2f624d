"""The embedded broker's two storage modes side by side: memory against durable (Tansu on a local S3 server).

Brings up a private stack per mode in a temporary state directory (``consumers.stack.EmbeddedStack``),
then measures with kafka-python, as the worker's producer is configured (acks=all, linger 5 ms):

- produce: ``--messages`` records of about 300 bytes, batched, flushed at the end (msg/s);
- acked send: ``--single`` records sent one at a time with no linger, each waited for (p50/p99 ms): every write
  the broker acknowledges has reached its storage, so this is the per-write cost of durability;
- consume: the same records read back from the beginning, counted (msg/s);
- commit: ``--single`` consumer-group offset commits, one at a time (p50/p99 ms);
- start: ``up`` on an empty state directory, and ``down`` + ``up`` with the records in place (s);
- disk: what the durable mode's data directory holds afterwards.

    python benchmarks/broker_storage.py
    python benchmarks/broker_storage.py --messages 50000 --single 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import loadavg, machine_info, print_figures, table, write_json
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata
from pydantic import SecretStr

from consumers import broker_storage
from consumers.stack import EmbeddedStack, free_port
from ranker.settings import KafkaSettings, RedisSettings, Settings

PARTITIONS = 2
MODES = ("memory", "durable")


def payload(i: int) -> bytes:
    """About 300 bytes of JSON, the size of a songs.generated event."""
    return json.dumps(
        {"song_id": f"song-{i:09d}", "audio_uri": f"https://cdn.example/audio/{i:09d}.mp3", "pad": "x" * 180}
    ).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(mode: str, messages: int, single: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"broker-{mode}-") as tmp:
        settings = Settings(
            state_dir=Path(tmp),
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
            redis=RedisSettings(url=SecretStr(f"redis://127.0.0.1:{free_port()}/0")),
        )
        stack = EmbeddedStack(settings, durable=mode == "durable")
        t0 = time.perf_counter()
        stack.up()
        start_s = time.perf_counter() - t0
        try:
            kw = settings.kafka.client_kwargs()
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            admin = KafkaAdminClient(**kw)
            admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
            admin.close()

            producer = KafkaProducer(acks="all", linger_ms=5, **kw)
            producer.send(topic, payload(-1)).get(timeout=30)  # metadata and connection, not timed
            t0 = time.perf_counter()
            for i in range(messages):
                producer.send(topic, payload(i))
            producer.flush(timeout=300)
            produce_s = time.perf_counter() - t0

            producer.close()
            one = KafkaProducer(acks="all", linger_ms=0, **kw)  # no linger: the round trip alone
            one.send(topic, payload(-2)).get(timeout=30)
            acked: list[float] = []
            for i in range(single):
                t0 = time.perf_counter()
                one.send(topic, payload(messages + i)).get(timeout=30)
                acked.append((time.perf_counter() - t0) * 1e3)
            one.close()
            total = messages + single + 2

            consumer = KafkaConsumer(enable_auto_commit=False, **kw)
            parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(parts)
            consumer.seek_to_beginning()
            got = 0
            t0 = time.perf_counter()
            deadline = time.monotonic() + 300
            while got < total and time.monotonic() < deadline:
                got += sum(len(r) for r in consumer.poll(timeout_ms=500, max_records=5000).values())
            consume_s = time.perf_counter() - t0
            consumer.close()
            if got != total:
                raise RuntimeError(f"{mode}: read {got} of {total} records back")

            group = KafkaConsumer(group_id=f"bench-{uuid.uuid4().hex[:8]}", enable_auto_commit=False, **kw)
            commits: list[float] = []
            for i in range(single):
                t0 = time.perf_counter()
                group.commit({parts[i % PARTITIONS]: OffsetAndMetadata(i + 1, "", -1)})
                commits.append((time.perf_counter() - t0) * 1e3)
            group.close(autocommit=False)

            stack.down()
            t0 = time.perf_counter()
            stack.up()
            restart_s = time.perf_counter() - t0
            check = KafkaConsumer(enable_auto_commit=False, **kw)
            kept = bool(check.partitions_for_topic(topic))
            check.close()
            disk = du(stack.dir / broker_storage.DATA_DIR) if mode == "durable" else 0
        finally:
            stack.down()
    return {
        "mode": mode,
        "produce_msg_s": messages / produce_s,
        "acked_p50_ms": statistics.median(acked),
        "acked_p99_ms": percentile(acked, 0.99),
        "consume_msg_s": got / consume_s,
        "commit_p50_ms": statistics.median(commits),
        "commit_p99_ms": percentile(commits, 0.99),
        "up_s": start_s,
        "down_up_s": restart_s,
        "kept_after_restart": kept,
        "disk_mib": disk / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000, help="records produced in batches, then consumed")
    ap.add_argument("--single", type=int, default=200, help="records sent one by one, and offset commits")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, each measuring both modes in turn")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    info = machine_info()
    print_figures({**info, "load before": loadavg(), "messages": args.messages, "single": args.single})
    rows = [measure(mode, args.messages, args.single) for _ in range(args.repeat) for mode in MODES]
    print()
    headers = list(rows[0])
    print(table("broker storage, memory vs durable (each round)", headers, [[r[h] for h in headers] for r in rows]))
    mem, dur = ({k: statistics.median(r[k] for r in rows if r["mode"] == m) for k in headers[1:]} for m in MODES)
    print()
    print("medians over the rounds:")
    print_figures(
        {
            "produce, durable/memory": f"{dur['produce_msg_s'] / mem['produce_msg_s']:.2f}x",
            "consume, durable/memory": f"{dur['consume_msg_s'] / mem['consume_msg_s']:.2f}x",
            "acked send p50, durable/memory": f"{dur['acked_p50_ms'] / mem['acked_p50_ms']:.2f}x",
            "load after": loadavg(),
        }
    )
    if args.json:
        write_json({"machine": info, "args": vars(args), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
