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
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer
from indexes import (
    DUPLICATE,
    NEW,
    REPLAY,
    EngagementCounters,
    SongRecord,
    message_marker,
    open_engagement_counters,
    open_score_store,
)
from indexes.engagement_log import EngagementLog, LoggedEvent
from indexes.redis_schema import COUNTER_FIELDS, ENGAGEMENT_COUNTERS, counter_field
from ranker import stores
from ranker.events import DeadLetter, Engagement
from ranker.serving.writer import write_scored
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


def test_caught_up_means_every_assigned_partition_read_to_its_end(settings: Settings) -> None:
    """What ``run(until_caught_up=True)`` waits for, on the real broker: not before the last record of
    every assigned partition is consumed, and false with nothing assigned."""
    from kafka import KafkaConsumer, TopicPartition

    from consumers.loop import caught_up

    topic = settings.kafka.topics.engagement
    publish(settings, [b"a", b"b", b"c"], [b"k1", b"k2", b"k3"])
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        assert not caught_up(consumer)  # nothing assigned
        deadline = time.monotonic() + 30
        while (
            len(consumer.partitions_for_topic(topic) or ()) < settings.kafka.topics.partitions
        ):  # metadata lags a create
            assert time.monotonic() < deadline, consumer.partitions_for_topic(topic)
            time.sleep(0.1)
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        assert not caught_up(consumer)
        got = 0
        while got < 3 and time.monotonic() < deadline:
            got += sum(len(r) for r in consumer.poll(timeout_ms=200, max_records=1).values())
            assert caught_up(consumer) == (got == 3), got  # one record a poll: true at the last, not before
        assert got == 3
    finally:
        consumer.close()


#: What each event type does to the song's counters, written out here rather than read from the
#: table the counting script is built from (a wrong entry there must not move the expectation too).
EVENT_EFFECT: dict[str, tuple[str, int]] = {
    "play": ("plays", 1),
    "complete": ("completes", 1),
    "like": ("likes", 1),
    "unlike": ("likes", -1),
    "skip": ("skips", 1),
    "share": ("shares", 1),
}
NO_COUNTS = {"plays": 0, "completes": 0, "likes": 0, "skips": 0, "shares": 0}


def expected_counts(events: list[Engagement]) -> dict[str, dict[str, int]]:
    """Counts from distinct events, with likes floored at zero in arrival order per song."""
    out: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        c = out.setdefault(e.song_id, dict(NO_COUNTS))
        counter, step = EVENT_EFFECT[e.type]
        c[counter] = max(0, c[counter] + step)
    return out


def test_the_event_table_is_the_one_written_out_here() -> None:
    """The counters and per-event deltas of the product's table, against the hand-written one."""
    assert set(ENGAGEMENT_COUNTERS) == set(NO_COUNTS)
    for kind, (counter, step) in EVENT_EFFECT.items():
        assert COUNTER_FIELDS[kind] == (counter_field(counter), step), kind
    assert {e.type for e in make_events(400, songs=25)} == {"play", "complete", "like", "unlike", "skip", "share"}


def open_counters(settings: Settings) -> EngagementCounters:
    """The engagement counters on the test's Redis and key prefix (a 60 s dedup window)."""
    return open_engagement_counters(
        settings.redis.url.get_secret_value(), key_prefix=settings.redis.key_prefix, dedup_window_s=60
    )


def actual_counts(settings: Settings, song_ids: list[str]) -> dict[str, dict[str, int]]:
    counters = open_counters(settings)
    try:
        return counters.counts(song_ids)
    finally:
        counters.close()


@pytest.mark.timeout(120)
def test_counters_are_exact_after_duplicates_and_bad_events(settings: Settings) -> None:
    # No idle timeout: the run ends only once every partition is read to its end (until_caught_up).
    events = make_events(400, songs=25)
    dupes = random.Random(3).sample(events, 60)
    # Event times a device's clock can send: a day ahead, and before feedback.ts_min. Both name a song
    # that has events, so counting either would move its counters.
    bad_ts = [
        events[0].model_copy(update={"event_id": "future", "ts": datetime.now(UTC) + timedelta(days=1)}),
        events[0].model_copy(update={"event_id": "ancient", "ts": datetime(2019, 12, 31, tzinfo=UTC)}),
    ]
    values = [e.to_bytes() for e in events + dupes + bad_ts] + [b"nope", json.dumps({"event_id": "x"}).encode()]
    keys: list[bytes | None] = [e.song_id.encode() for e in events + dupes + bad_ts] + [None, b"x"]
    publish(settings, values, keys)

    consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
    stats = consumer.run(until_caught_up=True)

    assert stats.accepted == 400 and stats.duplicates == 60 and stats.dead_letters == 4
    song_ids = sorted({e.song_id for e in events})
    assert actual_counts(settings, song_ids) == expected_counts(events)

    logged = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids = logged.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == 400
    letters = [
        DeadLetter.model_validate_json(m.value)
        for m in read_topic(settings, settings.kafka.topics.engagement_dead_letter, 4)
    ]
    assert sorted(d.error_code for d in letters) == ["invalid_json", "invalid_schema", "invalid_ts", "invalid_ts"]
    assert sorted(d.message.split(" ")[0] for d in letters if d.error_code == "invalid_ts") == ["ts", "ts"]


def test_the_consumer_serves_its_lag_and_its_dead_letters_by_code(settings: Settings) -> None:
    """What its --metrics-port serves: apexrank_consumer_lag_messages for the engagement topic (read after
    each batch, as the worker does) and apexrank_feedback_dead_letters_total by code."""
    settings = settings.model_copy(update={"feedback": FeedbackSettings(max_poll_records=10)})
    topic = settings.kafka.topics.engagement

    def lag(partition: int) -> float | None:
        return REGISTRY.get_sample_value(
            "apexrank_consumer_lag_messages", {"topic": topic, "partition": str(partition)}
        )

    def dead(code: str) -> float:
        return REGISTRY.get_sample_value("apexrank_feedback_dead_letters_total", {"code": code}) or 0.0

    before = {code: dead(code) for code in ("invalid_json", "invalid_schema")}
    values = [e.to_bytes() for e in make_events(60, songs=1, seed=13)]
    values += [b"nope", b"{", json.dumps({"event_id": "x"}).encode()]
    ensure_topics(settings.kafka, [topic])
    producer = make_producer(settings.kafka)
    for value in values:  # one record per produce request: the broker's high watermark is exact then
        flush_or_raise(producer, [producer.send(topic, key=b"one-partition", value=value)])
    producer.close()
    seen: list[float] = []  # the lag as each batch after the first starts on the feed update
    consumer = FeedbackConsumer(
        settings, on_engagement=lambda ids: seen.extend(v for v in (lag(0), lag(1)) if v is not None)
    )

    stats = consumer.run(until_idle_s=2.0, until_caught_up=True)

    assert stats.dead_letters == 3 and stats.accepted == 60
    assert seen and max(seen) > 0, seen  # behind while the batches of 10 are worked through
    (partition,) = set(EngagementLog(settings.engagement_log_dir, topic).read().column("partition").to_pylist())
    assert lag(partition) == 0, "caught up at the end"
    assert dead("invalid_json") - before["invalid_json"] == 2
    assert dead("invalid_schema") - before["invalid_schema"] == 1


def test_engagement_before_the_song_is_scored_is_kept(settings: Settings) -> None:
    ev = Engagement(event_id="early-1", song_id="not-yet", user_id="u", type="like", ts=datetime.now(UTC))
    publish(settings, [ev.to_bytes()], [b"not-yet"])
    FeedbackConsumer(settings, on_engagement=lambda ids: None).run(until_idle_s=2.0, until_caught_up=True)
    assert actual_counts(settings, ["not-yet"])["not-yet"]["likes"] == 1


def test_feed_updater_sees_every_song_whose_counters_changed(settings: Settings) -> None:
    events = make_events(50, songs=5, seed=9)
    publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    touched: list[str] = []
    FeedbackConsumer(settings, on_engagement=touched.extend).run(until_idle_s=2.0, until_caught_up=True)
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

    FeedbackConsumer(settings, on_engagement=lambda ids: None).run(until_idle_s=3.0, until_caught_up=True)
    song_ids = sorted({e.song_id for e in events})
    assert actual_counts(settings, song_ids) == expected_counts(events)
    logged = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids = logged.column("event_id").to_pylist()
    assert Counter(ids).most_common(1)[0][1] == 1 and len(ids) == len(events)


def counters_for(settings: Settings, per_song: bool | None, request: pytest.FixtureRequest | None = None) -> Any:
    """The Redis backend's counters, one script call per batch or per song (its client is used too);
    ``per_song=None``: on the session's Redis Cluster, where the URL picks one call per song."""
    if per_song is None:
        assert request is not None
        settings = request.getfixturevalue("cluster_settings")
        counters: Any = open_counters(settings)
        assert counters.per_song
        return counters
    counters = open_counters(settings)
    counters.per_song = per_song
    return counters


#: One node, one script call per batch; one node, one per song; Redis Cluster (one per song, each in its slot).
PATHS = pytest.mark.parametrize("per_song", [False, True, None], ids=["one-call", "per-song", "cluster"])


@PATHS
def test_count_statuses_new_replay_duplicate(
    settings: Settings, per_song: bool | None, request: pytest.FixtureRequest
) -> None:
    """A message seen again is a replay (its writes are owed), another message with the event a duplicate."""
    counters = counters_for(settings, per_song, request)
    try:
        songs, ids = ["a", "b", "a", "a"], ["e1", "e2", "e3", "e1"]
        types, markers = ["play", "like", "like", "play"], ["0:1", "0:2", "0:3", "0:4"]
        assert counters.count(songs, ids, types, markers, "t1") == NEW + NEW + NEW + DUPLICATE  # e1 twice
        assert counters.count(songs, ids, types, markers, "t2") == REPLAY + REPLAY + REPLAY + DUPLICATE
        assert counters.count(["a", "b"], ["e1", "e9"], ["play", "play"], ["1:7", "1:8"], "t3") == DUPLICATE + NEW
        assert counters.counts(["a", "b"]) == {
            "a": {"plays": 1, "completes": 0, "likes": 1, "skips": 0, "shares": 0},
            "b": {"plays": 1, "completes": 0, "likes": 1, "skips": 0, "shares": 0},
        }
        assert counters.count([], [], [], [], "t4") == ""
    finally:
        counters.close()


@PATHS
def test_a_script_error_writes_nothing_and_the_retry_counts(
    settings: Settings, per_song: bool | None, request: pytest.FixtureRequest
) -> None:
    """A song key of the wrong type fails the call before any dedup key is set: nothing is lost.

    One call for the batch: the whole batch fails and writes nothing, so the retry counts all
    three events as new. One call per song: song a's call goes through (its events counted),
    song b's fails alone, so the retry replays a's two events and counts b's.
    """
    counters = counters_for(settings, per_song, request)
    per_song = counters.per_song
    try:
        counters.client.set(counters.song_key("b"), "not a hash")
        args = (["a", "a", "b"], ["e1", "e2", "e3"], ["play", "like", "play"], ["0:1", "0:2", "0:3"], "t")
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            counters.count(*args)
        a_after_failure = {"plays": 1, "completes": 0, "likes": 1, "skips": 0, "shares": 0} if per_song else NO_COUNTS
        assert counters.counts(["a"]) == {"a": a_after_failure}
        assert counters.client.type(counters.song_key("b")) == "string"  # b untouched either way
        counters.client.delete(counters.song_key("b"))
        assert counters.count(*args) == (REPLAY * 2 + NEW if per_song else NEW * 3)
        assert counters.counts(["a", "b"]) == {
            "a": {"plays": 1, "completes": 0, "likes": 1, "skips": 0, "shares": 0},
            "b": {"plays": 1, "completes": 0, "likes": 0, "skips": 0, "shares": 0},
        }
    finally:
        counters.close()


@pytest.mark.parametrize("per_song", [False, True], ids=["one-call", "per-song"])
def test_likes_floor_at_zero_in_event_order_within_one_call(settings: Settings, per_song: bool) -> None:
    counters = counters_for(settings, per_song)
    try:
        kinds = ["unlike", "like", "unlike", "unlike", "like", "like", "unlike"]  # 0 1 0 0 1 2 1
        n = len(kinds)
        status = counters.count(["s"] * n, [f"u{i}" for i in range(n)], kinds, [f"0:{i}" for i in range(n)], "t")
        assert status == NEW * n
        assert counters.counts(["s"])["s"]["likes"] == 1
    finally:
        counters.close()


def test_a_failed_log_write_is_replayed_counting_nothing_twice(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, then the log write fails: the retried batch logs every event once and counts none twice."""
    settings = settings.model_copy(
        update={"feedback": settings.feedback.model_copy(update={"retry_initial_s": 0.05, "retry_max_s": 0.1})}
    )
    events = make_events(300, songs=12, seed=11)
    publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
    real = consumer.log.append_columns
    failures = []

    def flaky(columns: dict[str, list[object]]) -> int:
        if not failures:
            failures.append(len(columns["offset"]))
            raise OSError("disk went away")
        return real(columns)

    monkeypatch.setattr(consumer.log, "append_columns", flaky)
    stats = consumer.run(until_idle_s=2.0, until_caught_up=True)

    assert failures and failures[0] > 0
    assert stats.replayed == failures[0]  # the failed batch's events came back as replays...
    assert stats.accepted == 300 and stats.duplicates == 0  # ...and were accepted once
    assert actual_counts(settings, sorted({e.song_id for e in events})) == expected_counts(events)
    logged = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids = logged.column("event_id").to_pylist()
    assert sorted(ids) == sorted(e.event_id for e in events)


def test_real_feed_updater_rescores_played_songs(settings: Settings) -> None:
    """The default updater (ranker.serving.writer) moves the feed entry and claims the calibration share."""
    now = time.time()
    created = datetime.fromtimestamp(now, UTC).isoformat()
    scores = {"streams": 50.0, "likes": 50.0, "coherence": 3.0, "musicality": 3.0}
    scores |= {"memorability": 3.0, "clarity": 3.0, "naturalness": 3.0}
    store = stores.score_store(settings)
    try:
        write_scored(
            store,
            settings,
            [SongRecord(sid, "m1", scores, 0.5, "suno", created, created) for sid in ("liked", "skipped")],
        )
        before = dict(store.feed_page(settings.feed.name, 0, 10))
        t0 = datetime.now(UTC)
        events = [
            Engagement(event_id=f"{sid}-{i}", song_id=sid, user_id=f"u{i}", type=kind, ts=t0)
            for i in range(30)
            for sid, kind in (("liked", "like" if i % 2 else "play"), ("skipped", "play"))
        ]
        publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
        FeedbackConsumer(settings).run(until_idle_s=2.0, until_caught_up=True)
        after = dict(store.feed_page(settings.feed.name, 0, 10))
        assert after["liked"] > before["liked"] and after["skipped"] < before["skipped"]
        song = store.get_song("liked")
        assert song is not None and song["cal.likes"] == song["eng.likes"] == "15"
    finally:
        store.close()


def test_store_scripts_and_cluster_pipelines_agree(settings: Settings, cluster_settings: Settings) -> None:
    """read_fields and claim_calibration: one script call on one node; per-song pipelines (forced on
    one node, and on the real cluster, where its URL picks them) give the same results."""
    results = []
    for multi_key, url in (
        (True, settings.redis.url),
        (False, settings.redis.url),
        (False, cluster_settings.redis.url),
    ):
        prefix = f"{settings.redis.key_prefix}-{int(multi_key)}"
        store: Any = open_score_store(url.get_secret_value(), key_prefix=prefix)
        store.multi_key_scripts = multi_key
        try:
            for i, sid in enumerate(("a", "b", "c")):
                store.client.hset(store.song_key(sid), mapping={"eng.plays": 10 * (i + 1), "eng.likes": i})
            fields = store.read_fields(["a", "b", "c", "none"], ["eng.plays", "eng.likes", "missing"])
            first = store.claim_calibration({"a": 0.1, "b": 0.2, "c": 0.05})
            again = store.claim_calibration({"a": 0.1, "b": 0.2, "c": 0.05})
            results.append((fields, first, again, store.multi_key_scripts))
        finally:
            store.close()
    (f1, c1, a1, m1), (f2, c2, a2, m2), (f3, c3, a3, m3) = results
    assert m1 and not m2 and not m3
    assert f1 == f2 == f3 == [["10", "0", None], ["20", "1", None], ["30", "2", None], [None, None, None]]
    assert c1 == pytest.approx(c2) == c3 and c1 == pytest.approx((3.0, 10 * 0.1 + 20 * 0.2 + 30 * 0.05))
    assert a1 == pytest.approx(c1) and a2 == pytest.approx(c2) and a3 == pytest.approx(c3)  # claimed once only


def test_an_offset_range_logged_twice_after_a_rebalance_race_is_read_once(tmp_path: Path) -> None:
    """Two members both write offsets 10-12 (the old owner had not finished): one row per message."""
    ts = datetime(2026, 11, 26, tzinfo=UTC)

    def events(first: int, last: int) -> list[LoggedEvent]:
        return [LoggedEvent(f"e{o}", "s", "u", "play", ts, None, None, 0, o) for o in range(first, last + 1)]

    old_owner, new_owner = EngagementLog(tmp_path, "eng"), EngagementLog(tmp_path, "eng")
    assert new_owner.append(events(10, 15)) == 6
    assert old_owner.append(events(10, 12)) == 3  # its view of the log was from before the new owner's write
    assert len(list(tmp_path.glob("day=*/*.parquet"))) == 2
    table = EngagementLog(tmp_path, "eng").read()
    assert table.column("offset").to_pylist() == list(range(10, 16))


def test_a_file_is_dated_by_its_latest_event_so_one_old_ts_does_not_take_its_batch_away(tmp_path: Path) -> None:
    """A batch with one event from weeks ago (a late upload, a device's clock) is filed under its newest
    event's day: the retention keeps it while any of its rows is recent, and a day window reads it."""
    from consumers.evaluate_policy import _days

    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    stamps = [datetime(2026, 11, 1, tzinfo=UTC), now - timedelta(hours=2), now - timedelta(hours=1)]
    log = EngagementLog(tmp_path, "eng")
    assert log.append([LoggedEvent(f"e{o}", "s", "u", "play", ts, None, None, 0, o) for o, ts in enumerate(stamps)])
    assert log.append([LoggedEvent("e9", "s", "u", "play", now, None, None, 0, 9)]) == 1  # the partition's newest
    assert sorted(p.parent.name for p in tmp_path.glob("day=*/*.parquet")) == ["day=2026-12-04"] * 2
    assert log.prune(now - timedelta(days=30)) == 0
    assert len(EngagementLog(tmp_path, "eng").read(_days(now - timedelta(hours=3), now))) == 4


def test_a_restarted_partition_keeps_its_old_rows_as_a_generation_and_logs_the_new_ones(tmp_path: Path) -> None:
    """restart (the topic's offsets started again): the old files stay readable, the same offsets log
    again, each row is read once per generation, and the live files alone say what is logged."""
    ts = datetime(2026, 12, 4, tzinfo=UTC)

    def events(tag: str, first: int, last: int, partition: int = 0) -> list[LoggedEvent]:
        return [
            LoggedEvent(f"{tag}{o}", "s", "u", "play", ts, None, None, partition, o) for o in range(first, last + 1)
        ]

    log = EngagementLog(tmp_path, "eng")
    assert log.follow_topic("id-1") == 0  # the first id seen is adopted
    assert log.append(events("old", 0, 9)) == 10 and log.append(events("p1-", 0, 3, partition=1)) == 4
    assert log.append(events("new", 0, 4)) == 0  # what a replay looks like: skipped
    assert log.restart(0) == 1 and log.logged_through(0) == -1 and log.logged_through(1) == 3
    assert log.append(events("new", 0, 4)) == 5
    assert log.append(events("old", 3, 4)) == 0  # a replay of the new generation is still skipped
    again = EngagementLog(tmp_path, "eng")
    assert (again.logged_through(0), again.logged_through(1)) == (4, 3)
    ids = again.read().column("event_id").to_pylist()
    assert ids[:10] == [f"old{o}" for o in range(10)] and sorted(ids[10:]) == sorted(
        [f"new{o}" for o in range(5)] + [f"p1-{o}" for o in range(4)]
    )
    assert again.prune(ts + timedelta(days=30)) == 1  # the earlier generation goes; each newest live file stays
    assert again.follow_topic("id-1") == 0 and again.follow_topic("id-2") == 2  # made again: both partitions
    assert again.logged_through(0) == again.logged_through(1) == -1 and len(again.read()) == 9


def test_a_temporary_a_crash_left_goes_with_a_later_write_or_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash mid-write leaves ``.<name>.parquet.tmp``, and the replay logs another offset range, so no write
    takes its name. A write removes this topic's once it is an hour old (a younger one may be another member's
    write in flight; another topic's is its own log's), so does a prune, and the day folder it kept goes."""
    import indexes.engagement_log as engagement_log

    ts = datetime(2026, 12, 4, tzinfo=UTC)
    hour_ago = time.time() - 3700

    def left(day: str, name: str, old: bool) -> Path:
        path = tmp_path / f"day={day}" / f".{name}.parquet.tmp"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"PAR1" + b"\0" * 100)  # half a file
        if old:
            os.utime(path, (hour_ago, hour_ago))
        return path

    crashed = left("2026-12-04", "eng-p0-o0-99", old=True)
    in_flight = left("2026-12-04", "eng-p1-o0-9", old=False)
    other_topic = left("2026-12-04", "served-p0-o0-9", old=True)
    log = EngagementLog(tmp_path, "eng")
    assert log.append([LoggedEvent(f"e{o}", "s", "u", "play", ts, None, None, 0, o) for o in range(150)]) == 150
    assert not crashed.exists() and in_flight.exists() and other_topic.exists()

    # Left since the last write looked (writes look at most hourly): the retention's prune takes it, and its folder.
    old_day = left("2026-11-01", "eng-p0-o150-170", old=True).parent
    young_day = left("2026-11-02", "eng-p1-o10-20", old=False).parent
    assert log.prune(ts + timedelta(days=1)) == 0  # the partition's newest file stays
    assert not old_day.exists() and young_day.exists()
    assert sorted(p.name for p in (tmp_path / "day=2026-12-04").iterdir()) == sorted(
        [in_flight.name, other_topic.name, "eng-p0-o0-149.parquet"]
    )

    # A write that fails (the disk filled) takes its own temporary away at once.
    def fills(table: object, where: Path, **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engagement_log.pq, "write_table", fills)
    with pytest.raises(OSError):
        log.append([LoggedEvent("e150", "s", "u", "play", ts, None, None, 0, 150)])
    monkeypatch.undo()
    assert not list(tmp_path.glob("day=*/.eng-p0-*.tmp"))
    assert log.append([LoggedEvent("e150", "s", "u", "play", ts, None, None, 0, 150)]) == 1


def test_a_position_beyond_the_logs_int32_is_refused_not_crashed_on() -> None:
    from ranker.errors import InputError

    base = {"event_id": "e", "song_id": "s", "user_id": "u", "type": "play", "ts": "2026-11-26T00:00:00Z"}
    assert Engagement.parse(json.dumps(base | {"position": 2**31 - 1}).encode()).position == 2**31 - 1
    with pytest.raises(InputError):
        Engagement.parse(json.dumps(base | {"position": 2**31}).encode())


def test_message_markers_are_distinct_integers() -> None:
    seen = {message_marker(p, o) for p in (0, 1, 2, 500) for o in (0, 1, 2**40, 2**44 - 1)}
    assert len(seen) == 16 and all(m.isdigit() for m in seen) and "1" not in seen
