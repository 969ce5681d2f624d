"""The feedback consumer on the real embedded broker and Redis: exact counters, exactly-once log."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import redis

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer
from indexes.engagement_log import EngagementLog
from indexes.redis_engagement import COUNTERS, CountedEvent, RedisEngagementCounters, counter_deltas
from ranker.events import DeadLetter, Engagement
from ranker.settings import FeedbackSettings, Settings
from tests.helpers import read_topic, settings_env

TYPES = ["play", "play", "play", "complete", "like", "skip", "share", "unlike"]


def make_events(n: int, songs: int, seed: int = 1) -> list[Engagement]:
    rng = random.Random(seed)
    t0 = datetime(2026, 11, 25, 23, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        kind = rng.choice(TYPES)
        out.append(
            Engagement(
                event_id=f"e{seed}-{i}",
                song_id=f"song-{rng.randrange(songs)}",
                user_id=f"u{rng.randrange(50)}",
                type="like" if kind == "unlike" and i % 2 else kind,  # keep unlikes rarer than likes
                ts=t0 + timedelta(seconds=7 * i),
                feed="cold-start",
                position=rng.randrange(50),
            )
        )
    return out


def publish(settings: Settings, values: list[bytes], keys: list[bytes | None]) -> None:
    ensure_topics(settings.kafka, [settings.kafka.topics.engagement])
    producer = make_producer(settings.kafka)
    futures = [
        producer.send(settings.kafka.topics.engagement, key=k, value=v) for k, v in zip(keys, values, strict=True)
    ]
    flush_or_raise(producer, futures)
    producer.close()


def expected_counts(events: list[Engagement]) -> dict[str, dict[str, int]]:
    """Counts from distinct events, with likes floored at zero in arrival order per song."""
    out: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        c = out.setdefault(e.song_id, dict.fromkeys(COUNTERS, 0))
        delta = counter_deltas([CountedEvent(e.event_id, e.song_id, e.type)])[e.song_id]
        for k, v in delta.items():
            c[k] = max(0, c[k] + v)
    return out


def actual_counts(settings: Settings, song_ids: list[str]) -> dict[str, dict[str, int]]:
    counters = RedisEngagementCounters.from_url(settings.redis.url.get_secret_value(), settings.redis.key_prefix, 60)
    try:
        return counters.counts(song_ids)
    finally:
        counters.close()


def test_counters_are_exact_after_duplicates_and_bad_events(settings: Settings) -> None:
    events = make_events(400, songs=25)
    dupes = random.Random(3).sample(events, 60)
    values = [e.to_bytes() for e in events + dupes] + [b"nope", json.dumps({"event_id": "x"}).encode()]
    keys: list[bytes | None] = [e.song_id.encode() for e in events + dupes] + [None, b"x"]
    publish(settings, values, keys)

    consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
    stats = consumer.run(until_idle_s=2.0)

    assert stats.accepted == 400 and stats.duplicates == 60 and stats.dead_letters == 2
    song_ids = sorted({e.song_id for e in events})
    assert actual_counts(settings, song_ids) == expected_counts(events)

    logged = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids = logged.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == 400
    letters = [
        DeadLetter.model_validate_json(m.value)
        for m in read_topic(settings, settings.kafka.topics.engagement_dead_letter, 2)
    ]
    assert sorted(d.error_code for d in letters) == ["invalid_json", "invalid_schema"]


def test_engagement_before_the_song_is_scored_is_kept(settings: Settings) -> None:
    ev = Engagement(event_id="early-1", song_id="not-yet", user_id="u", type="like", ts=datetime.now(UTC))
    publish(settings, [ev.to_bytes()], [b"not-yet"])
    FeedbackConsumer(settings, on_engagement=lambda ids: None).run(until_idle_s=2.0)
    assert actual_counts(settings, ["not-yet"])["not-yet"]["likes"] == 1


def test_feed_updater_sees_every_song_whose_counters_changed(settings: Settings) -> None:
    events = make_events(50, songs=5, seed=9)
    publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    touched: list[str] = []
    FeedbackConsumer(settings, on_engagement=touched.extend).run(until_idle_s=2.0)
    assert set(touched) == {e.song_id for e in events}


def test_sigkill_mid_batch_then_restart_counts_each_event_once(settings: Settings) -> None:
    settings = settings.model_copy(update={"feedback": FeedbackSettings(max_poll_records=50)})
    events = make_events(6000, songs=40, seed=5)
    publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "feedback"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    r = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix = settings.redis.key_prefix
    deadline = time.monotonic() + 120
    total = 0
    while time.monotonic() < deadline:
        total = sum(int(r.hget(k, "eng.plays") or 0) for k in r.scan_iter(f"{prefix}:song:*"))
        if total > 300:
            break
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    plays_expected = sum(1 for e in events if e.type == "play")
    assert 300 < total < plays_expected, "the kill must land while work is in flight"

    FeedbackConsumer(settings, on_engagement=lambda ids: None).run(until_idle_s=3.0)
    song_ids = sorted({e.song_id for e in events})
    assert actual_counts(settings, song_ids) == expected_counts(events)
    logged = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids = logged.column("event_id").to_pylist()
    assert Counter(ids).most_common(1)[0][1] == 1 and len(ids) == len(events)
