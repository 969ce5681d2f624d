"""Feedback consumer throughput against kafka-python's raw consume rate, on the embedded stack.

Scores ``--songs`` songs into Redis first through the worker's own write path
(``ranker.serving.writer.write_scored``: song hashes plus the feed), publishes N
engagement events (with a share of duplicates) to a fresh topic, measures a
plain kafka-python consumer reading them, then the feedback consumer processing
them with everything it does in production: parse, dedup, engagement log, Lua
counters, the real feed updater (``ranker.serving.writer.make_engagement_updater``),
dead letters, commit. At the end it checks the counters exactly, and that the
feed updater saw every song's final counters (its calibration claim ``cal.likes``
equals ``eng.likes`` and the song is in the feed). ``--no-feed-updates`` swaps
the updater for a no-op to isolate its cost. Prints a table and the consumer's
time per step; ``--json`` writes the figures, ``--profile`` a cProfile of the
consumer. Peak memory is the process's max RSS.

    python benchmarks/feedback_throughput.py --events 200000
    python benchmarks/feedback_throughput.py --events 1000000 --songs 100000
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis
from _common import git_state, print_figures, write_json
from kafka import KafkaConsumer

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, make_producer
from consumers.stack import EmbeddedStack, free_port
from indexes.base import SongRecord
from indexes.redis_schema import ENGAGEMENT_COUNTERS
from ranker import stores
from ranker.events import AESTHETIC_TASKS
from ranker.serving import writer as feeds
from ranker.settings import FeedbackSettings, KafkaSettings, RedisSettings, Settings, TopicSettings

TYPES = np.array(["play", "complete", "like", "skip", "share"])
PROBS = np.array([0.55, 0.2, 0.1, 0.12, 0.03])
GENERATORS = ("suno-v5", "udio-2", "riffusion")


def build_settings(state: Path, max_poll: int) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        state_dir=state,
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}",
            topics=TopicSettings(engagement=f"b{tag}.engagement", engagement_dead_letter=f"b{tag}.dl", partitions=3),
            feedback_group_id=f"bench-{tag}",
        ),
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=f"b{tag}"),
        feedback=FeedbackSettings(max_poll_records=max_poll),
    )


def score_songs(settings: Settings, songs: int, seed: int, chunk: int = 2000) -> float:
    """Write ``songs`` scored songs the way the worker does (hash + feed entries); returns seconds."""
    rng = np.random.default_rng(seed + 1)
    now = time.time()
    store = stores.score_store(settings)
    start = time.perf_counter()
    try:
        for lo in range(0, songs, chunk):
            n = min(chunk, songs - lo)
            likes, streams = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
            aesthetic = rng.uniform(1, 5, (n, len(AESTHETIC_TASKS)))
            age_s = rng.uniform(0, 48 * 3600, n)
            records = []
            for j in range(n):
                created = datetime.fromtimestamp(now - age_s[j], UTC).isoformat()
                scores = {"likes": float(likes[j]), "streams": float(streams[j])}
                scores.update({t: float(v) for t, v in zip(AESTHETIC_TASKS, aesthetic[j], strict=True)})
                records.append(
                    SongRecord(
                        song_id=f"s{lo + j}",
                        model_version="bench-1",
                        scores=scores,
                        rank_score=0.5,
                        generator=GENERATORS[(lo + j) % len(GENERATORS)],
                        created_at=created,
                        scored_at=datetime.fromtimestamp(now, UTC).isoformat(),
                    )
                )
            feeds.write_scored(store, settings, records)
    finally:
        store.close()
    return time.perf_counter() - start


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
        expected.setdefault(song, dict.fromkeys(ENGAGEMENT_COUNTERS, 0))[field] += 1
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
    """kafka-python alone, with the feedback consumer's poll size: poll until all n are read."""
    max_poll = settings.feedback.max_poll_records
    consumer = KafkaConsumer(
        settings.kafka.topics.engagement,
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=max_poll,
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


def check_feed_updates(settings: Settings, song_ids: list[str]) -> tuple[bool, int]:
    """Every song with engagement: its calibration claim caught up with its likes, and it is in the feed.

    The feed updater claims ``cal.likes`` from the song hash after reading the counters, so equality
    means it ran for the song after its last counter change. Returns (all good, songs checked).
    """
    client = redis.Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
    prefix = settings.redis.key_prefix
    feed_key = f"{prefix}:feed:{{{settings.feed.name}}}"
    ok = True
    try:
        for lo in range(0, len(song_ids), 5000):
            chunk = song_ids[lo : lo + 5000]
            pipe = client.pipeline(transaction=False)
            for sid in chunk:
                pipe.hmget(f"{prefix}:song:{{{sid}}}", ["eng.likes", "cal.likes"])
            rows = pipe.execute()
            scores = client.zmscore(feed_key, chunk)
            for (likes, cal), score in zip(rows, scores, strict=True):
                if int(likes or 0) != int(float(cal or 0)) or score is None:
                    ok = False
    finally:
        client.close()
    return ok, len(song_ids)


_HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: of this process, of each named pid, and of the whole machine (busy)."""
    out = {"consumer": time.process_time()}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(stat[11]) + int(stat[12])) / _HZ  # utime + stime
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        out["machine"] = (sum(f[:8]) - f[3] - f[4]) / _HZ  # everything but idle and iowait
    return out


def run_consumer(settings: Settings, feed_updates: bool, profile: Path | None) -> tuple[FeedbackConsumer, str]:
    consumer = FeedbackConsumer(settings, on_engagement=None if feed_updates else (lambda ids: None))
    if profile is None:
        consumer.run(until_idle_s=3.0)
        return consumer, ""
    prof = cProfile.Profile()
    prof.enable()
    consumer.run(until_idle_s=3.0)
    prof.disable()
    prof.dump_stats(profile)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    return consumer, out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--songs", type=int, default=20_000)
    ap.add_argument("--duplicates", type=float, default=0.05)
    ap.add_argument("--max-poll", type=int, default=FeedbackSettings().max_poll_records)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-feed-updates", action="store_true", help="a no-op feed updater (isolates its cost)")
    ap.add_argument("--profile", type=Path, help="cProfile the consumer into this file; print the top 30")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    feed_updates = not args.no_feed_updates

    with tempfile.TemporaryDirectory() as tmp:
        settings = build_settings(Path(tmp), args.max_poll)
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            score_s = score_songs(settings, args.songs, args.seed)
            produce_s, expected = produce(settings, args.events, args.songs, args.duplicates, args.seed)
            raw_s = raw_consume(settings, args.events)
            pids = {s.name: s.pid for s in stack.status() if s.pid is not None}
            load_before = os.getloadavg()
            cpu_before, wall_before = cpu_seconds(pids), time.perf_counter()
            consumer, profile_text = run_consumer(settings, feed_updates, args.profile)
            cpu_after, wall = cpu_seconds(pids), time.perf_counter() - wall_before
            load_after = os.getloadavg()
            stats = consumer.stats
            total_s = stats.busy_s  # first message polled to last commit: no group join, no idle tail
            # Exact check: counters equal the distinct events.
            counters = stores.engagement_counters(settings)
            actual = counters.counts(sorted(expected))
            counters.close()
            exact = actual == expected
            feed_ok, checked = check_feed_updates(settings, sorted(expected)) if feed_updates else (None, 0)
        finally:
            stack.down()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = stats.messages / total_s
    raw_rate = args.events / raw_s
    figures = {
        "events": args.events,
        "songs_scored": args.songs,
        "feed_updates": feed_updates,
        "unique_events": stats.accepted,
        "duplicates_dropped": stats.duplicates,
        "batches": stats.batches,
        "scoring_songs_s": round(score_s, 1),
        "kafka_python_produce_per_s": round(args.events / produce_s),
        "kafka_python_raw_consume_per_s": round(raw_rate),
        "feedback_consumer_per_s": round(rate),
        "share_of_raw_consume": round(rate / raw_rate, 3),
        "counters_exact": exact,
        "feed_updates_complete": feed_ok,
        "songs_checked": checked,
        "peak_rss_mb": round(rss_mb),
        "max_poll_records": args.max_poll,
        "load_avg_1m_before_after": f"{load_before[0]:.2f} / {load_after[0]:.2f}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "commit": git_state(),
    }
    print_figures(figures)
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    if "machine" in cpu:
        cpu["other processes"] = max(0.0, cpu.pop("machine") - sum(cpu.values()))
    print(f"CPU seconds during the consumer run ({wall:.1f} s wall incl. group join and 3 s idle tail,")
    print(f"{os.cpu_count()} cores = {wall * (os.cpu_count() or 1):.1f} core-s):")
    for name, secs in cpu.items():
        print(f"  {name:<16} {secs:7.1f}")
    figures["cpu_s"] = {k: round(v, 2) for k, v in cpu.items()}
    figures["consumer_run_wall_s"] = round(wall, 2)
    print("consumer time per step (s, share of busy time):")
    for step, secs in getattr(stats, "step_s", {}).items():
        print(f"  {step:<10} {secs:8.2f}  {secs / total_s:6.1%}")
    figures["step_s"] = {k: round(v, 3) for k, v in getattr(stats, "step_s", {}).items()}
    if profile_text:
        print(profile_text)
    if args.json:
        write_json(figures, args.json)
    if not exact:
        raise SystemExit("counters do not match the distinct events")
    if feed_ok is False:
        raise SystemExit("the feed updater missed some songs' final counters")


if __name__ == "__main__":
    main()
