"""Feedback consumer throughput against kafka-python's raw consume rate, on the embedded stack.

Publishes N engagement events (with a share of duplicates) to a fresh topic,
measures a plain kafka-python consumer reading them, then the feedback
consumer processing them (parse, dedup, engagement log, Lua counters, commit),
and checks the counters exactly at the end. Prints a table; ``--json`` writes
the figures. Peak memory is the process's max RSS.

    python benchmarks/feedback_throughput.py --events 200000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, make_producer
from consumers.stack import EmbeddedStack, free_port
from indexes.redis_engagement import COUNTERS, RedisEngagementCounters
from ranker.settings import FeedbackSettings, KafkaSettings, RedisSettings, Settings, TopicSettings

TYPES = np.array(["play", "complete", "like", "skip", "share"])
PROBS = np.array([0.55, 0.2, 0.1, 0.12, 0.03])


def build_settings(state: Path, max_poll: int) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        state_dir=state,
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}",
            topics=TopicSettings(engagement=f"b{tag}.engagement", engagement_dead_letter=f"b{tag}.dl", partitions=3),
            feedback_group_id=f"bench-{tag}",
        ),
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=f"b{tag}"),  # type: ignore[arg-type]
        feedback=FeedbackSettings(max_poll_records=max_poll),
    )


def produce(
    settings: Settings, n: int, songs: int, dup_share: float, seed: int
) -> tuple[float, dict[str, dict[str, int]]]:
    """Publish the events; returns (seconds, expected counters per song)."""
    rng = np.random.default_rng(seed)
    unique = int(n * (1 - dup_share))
    song_idx = rng.zipf(1.3, size=unique) % songs
    kinds = rng.choice(TYPES, size=unique, p=PROBS)
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    payloads = []
    expected: dict[str, dict[str, int]] = {}
    for i in range(unique):
        song = f"s{song_idx[i]}"
        kind = str(kinds[i])
        ts = (t0 + timedelta(milliseconds=i)).isoformat()
        payloads.append(
            (
                song.encode(),
                json.dumps(
                    {"event_id": f"e{i}", "song_id": song, "user_id": f"u{i % 5000}", "type": kind, "ts": ts}
                ).encode(),
            )
        )
        field = {"play": "plays", "complete": "completes", "like": "likes", "skip": "skips", "share": "shares"}[kind]
        expected.setdefault(song, dict.fromkeys(COUNTERS, 0))[field] += 1
    dups = [payloads[j] for j in rng.integers(0, unique, size=n - unique)]
    payloads += dups
    ensure_topics(settings.kafka, [settings.kafka.topics.engagement, settings.kafka.topics.engagement_dead_letter])
    producer = make_producer(settings.kafka)
    start = time.perf_counter()
    for key, value in payloads:
        producer.send(settings.kafka.topics.engagement, key=key, value=value)
    producer.flush()
    elapsed = time.perf_counter() - start
    producer.close()
    return elapsed, expected


def raw_consume(settings: Settings, n: int) -> float:
    consumer = KafkaConsumer(
        settings.kafka.topics.engagement,
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=2000,
        **settings.kafka.client_kwargs(),
    )
    got = 0
    start = None
    while got < n:
        batch = consumer.poll(timeout_ms=1000)
        if batch and start is None:
            start = time.perf_counter()
        got += sum(len(v) for v in batch.values())
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--songs", type=int, default=20_000)
    ap.add_argument("--duplicates", type=float, default=0.05)
    ap.add_argument("--max-poll", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = build_settings(Path(tmp), args.max_poll)
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            produce_s, expected = produce(settings, args.events, args.songs, args.duplicates, args.seed)
            raw_s = raw_consume(settings, args.events)
            consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
            stats = consumer.run(until_idle_s=3.0)
            total_s = stats.busy_s  # first message polled to last commit: no group join, no idle tail
            # Exact check: counters equal the distinct events.
            counters = RedisEngagementCounters.from_url(
                settings.redis.url.get_secret_value(), settings.redis.key_prefix, 60
            )
            actual = counters.counts(sorted(expected))
            counters.close()
            exact = actual == expected
        finally:
            stack.down()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {
        "events": args.events,
        "unique_events": stats.accepted,
        "duplicates_dropped": stats.duplicates,
        "kafka_python_produce_per_s": round(args.events / produce_s),
        "kafka_python_raw_consume_per_s": round(args.events / raw_s),
        "feedback_consumer_per_s": round(stats.messages / total_s),
        "share_of_raw_consume": round((stats.messages / total_s) / (args.events / raw_s), 3),
        "counters_exact": exact,
        "peak_rss_mb": round(rss_mb),
        "max_poll_records": args.max_poll,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not exact:
        raise SystemExit("counters do not match the distinct events")


if __name__ == "__main__":
    main()
