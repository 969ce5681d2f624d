"""The worker recovers from an emptied broker without losing what Redis and the embedding store hold.

A memory-mode broker that restarts comes back with no topics, no records and no committed
offsets. The tests run on a private stack, so restarting its broker never touches the session's:

1. A worker scores songs.
2. The broker restarts empty, once with the worker stopped and once with it running.
3. The scored songs are still ranked in Redis and served by the API, including similar songs
   from the embedding store.
4. The worker recreates the topics with the configured partition count and scores every song
   published after the restart exactly once. A worker kept running must not trust the fetch
   positions it held on the old broker's partitions (docs/broker.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from consumers.kafka_io import Publisher
from consumers.publish import publish_events
from consumers.stack import EmbeddedStack
from consumers.worker import Worker
from ranker.events import Engagement, SongGenerated
from ranker.serving.api import create_app
from ranker.settings import Settings
from tests.helpers import read_topic, wait_for
from tests.test_durable_broker import private_settings
from tests.test_faults import (
    assert_exactly_once,
    committed_total,
    fast_retry,
    partition_counts,
    running_worker,
    songs,
    topics_as_configured,
)
from tests.test_worker import feed, song, stored_layers


@pytest.fixture
def private_stack(settings: Settings, tmp_path: Path) -> Iterator[tuple[EmbeddedStack, Settings]]:
    """A memory-mode stack of the test's own."""
    s = fast_retry(private_settings(settings, tmp_path / "private-state"))
    stack = EmbeddedStack(s, durable=False)
    stack.up()
    try:
        yield stack, s
    finally:
        stack.down()


def score(s: Settings, events: list[SongGenerated]) -> None:
    publish_events(s, events)
    wait_for("songs before the restart", lambda: len(feed(s)) == len(events))
    wait_for("their commit", lambda: committed_total(s) == len(events))


def empty_the_broker(stack: EmbeddedStack, s: Settings) -> None:
    stack.stop_one("kafka")
    stack.up()
    assert s.kafka.topics.songs_generated not in partition_counts(s), "the broker was not emptied"


def check_still_served(s: Settings, ids: list[str]) -> None:
    """Redis still ranks the songs, and the API serves them, similar songs from the embedding store."""
    assert sorted(x for x, _ in feed(s)) == sorted(ids)
    assert all(song(s, x) is not None for x in ids)
    with TestClient(create_app(s)) as client:
        served = client.get(f"/v1/feeds/{s.feed.name}", params={"limit": 50})
        assert served.status_code == 200, served.text
        assert sorted(i["song_id"] for i in served.json()["items"]) == sorted(ids)
        similar = client.get(f"/v1/songs/{ids[0]}/similar", params={"k": 3})
        assert similar.status_code == 200, similar.text
        hits = {i["song_id"] for i in similar.json()["items"]}
        assert hits and hits <= set(ids[1:]), hits


def check_nothing_lost_or_doubled(
    s: Settings, worker: Worker, before: list[SongGenerated], after: list[SongGenerated]
) -> None:
    before_ids, after_ids = [e.song_id for e in before], [e.song_id for e in after]
    assert_exactly_once(s, worker, before_ids + after_ids)
    assert sorted(stored_layers(s, worker.encoder.vector_dim, before_ids)) == sorted(before_ids)
    assert topics_as_configured(s), partition_counts(s)
    rescored = sorted(m.key.decode() for m in read_topic(s, s.kafka.topics.songs_scored, expect=len(after)))
    assert rescored == sorted(after_ids), "songs.scored after the restart holds each new song once"


def test_worker_recovers_from_an_emptied_broker(private_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> None:
    stack, s = private_stack
    before, after = songs(tmp_path, "pre", 4), songs(tmp_path, "post", 4)
    with running_worker(s):
        score(s, before)
    empty_the_broker(stack, s)
    check_still_served(s, [e.song_id for e in before])
    with running_worker(s) as worker:  # its start-up recreates every topic it uses
        publish_events(s, after)
        wait_for("songs after the restart", lambda: len(feed(s)) == len(before) + len(after), timeout_s=60)
        wait_for("their commit", lambda: committed_total(s) == len(after), timeout_s=30)
    check_nothing_lost_or_doubled(s, worker, before, after)


def test_a_running_worker_recovers_from_an_emptied_broker(
    private_stack: tuple[EmbeddedStack, Settings], tmp_path: Path
) -> None:
    """The worker keeps running through the restart: every song published after it is scored once."""
    stack, s = private_stack
    before, after = songs(tmp_path, "pre", 6), songs(tmp_path, "post", 6)
    with running_worker(s) as worker:
        score(s, before)
        empty_the_broker(stack, s)
        check_still_served(s, [e.song_id for e in before])
        wait_for("the worker to recreate its topics", lambda: topics_as_configured(s), timeout_s=60)
        publish_events(s, after)
        wait_for("songs after the restart", lambda: len(feed(s)) == len(before) + len(after), timeout_s=60)
        wait_for("their commit", lambda: committed_total(s) == len(after), timeout_s=30)
    assert worker.stats.scored == len(before) + len(after), worker.stats
    check_nothing_lost_or_doubled(s, worker, before, after)


def test_a_publisher_creates_missing_topics_as_configured(settings: Settings) -> None:
    """A fresh producer first creates the batch's missing topics, with the configured partition
    count: it never lets the broker create them with its default, nor waits for them."""
    topic = settings.kafka.topics.songs_scored
    assert topic not in partition_counts(settings)
    publisher = Publisher(settings.kafka)
    try:
        assert publisher.publish([(topic, b"song", b"{}")]) == []
    finally:
        publisher.close()
    assert partition_counts(settings)[topic] == settings.kafka.topics.partitions


def test_caught_up_is_false_not_an_error_while_the_broker_is_down(
    private_stack: tuple[EmbeddedStack, Settings],
) -> None:
    """``run(until_caught_up=True)`` asks on every empty poll; a broker that stops answering makes the
    answer "not yet" (the loop's own retries deal with the broker), never an exception that ends the run."""
    from kafka import KafkaConsumer, TopicPartition

    from consumers.loop import caught_up

    stack, s = private_stack
    topic = s.kafka.topics.engagement
    publisher = Publisher(s.kafka)
    try:
        assert publisher.publish([(topic, b"k", b"v")]) == []
    finally:
        publisher.close()
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka.client_kwargs())
    try:
        parts = [TopicPartition(topic, p) for p in range(s.kafka.topics.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        got = 0
        while not caught_up(consumer):
            got += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        assert got == 1
        stack.stop_one("kafka")
        assert not caught_up(consumer)
    finally:
        consumer.close()


def test_a_read_that_raced_a_close_logs_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """kafka-python 3.0's transport logs an ERROR traceback when its read task wakes after ``close()``
    cleared the socket (seen on clean shutdowns of the loop simulation's workers). The library's own
    read path runs here: on a closed transport the message is dropped, on an open one it is kept."""
    from kafka.net.transport import KafkaTCPTransport

    import consumers.kafka_io  # noqa: F401  (installs the filter)

    caplog.set_level(logging.DEBUG, logger="kafka.net.transport")

    def logged(transport: KafkaTCPTransport) -> list[logging.LogRecord]:
        caplog.clear()
        _, err = transport._sock_recv()
        assert err is not None  # the library still aborts the read
        return [r for r in caplog.records if "Error receiving network data" in r.getMessage()]

    closed = KafkaTCPTransport(None, None)
    closed._closed = True
    assert logged(closed) == []
    assert len(logged(KafkaTCPTransport(None, None))) == 1


@pytest.mark.parametrize("topic_ids", [True, False])
def test_the_engagement_log_keeps_logging_after_the_broker_comes_back_empty(
    private_stack: tuple[EmbeddedStack, Settings], monkeypatch: pytest.MonkeyPatch, topic_ids: bool
) -> None:
    """The log skips offsets it already holds (a replayed batch). After an emptied broker the offsets
    start at 0 again, with new events. With topic ids (Tansu, Kafka 2.8+) there are more of them than
    before, so no partition's high watermark is below what its log holds and only the topic's new id
    shows the restart; without (an older broker) there are fewer, and the high watermark shows it.
    Every event of both topics' lives is logged once."""
    import consumers.feedback
    from consumers.feedback import FeedbackConsumer
    from indexes.engagement_log import EngagementLog
    from tests.test_feedback import make_events, publish

    stack, s = private_stack
    sizes = (20, 60) if topic_ids else (60, 20)
    if not topic_ids:
        monkeypatch.setattr(consumers.feedback, "topic_id", lambda consumer, topic: None)
    before, after = make_events(sizes[0], songs=4, seed=31), make_events(sizes[1], songs=4, seed=32)

    def consume(events: list[Engagement]) -> None:
        publish(s, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
        stats = FeedbackConsumer(s, on_engagement=lambda ids: None).run(until_idle_s=10.0, until_caught_up=True)
        assert stats.accepted == len(events), stats

    consume(before)
    empty_the_broker(stack, s)
    consume(after)
    logged = EngagementLog(s.engagement_log_dir, s.kafka.topics.engagement).read().column("event_id").to_pylist()
    assert sorted(logged) == sorted(e.event_id for e in before + after)


def test_a_member_that_finds_the_new_topic_id_recorded_logs_the_new_records(tmp_path: Path) -> None:
    """Members of the feedback group share the log's directory. The topic is made again (a new id,
    offsets from 0): the first member to see it sets every partition's files aside and records the id.
    The others find the id already recorded and must still forget the offsets they held (one that
    followed the old id, one that never followed any), or they would skip the new records up to them."""
    from datetime import UTC, datetime

    from indexes.engagement_log import EngagementLog, LoggedEvent

    ts = datetime.now(UTC)

    def events(tag: str, partition: int, count: int) -> list[LoggedEvent]:
        return [
            LoggedEvent(f"{tag}{partition}-{o}", "s", "u", "play", ts, None, None, partition, o) for o in range(count)
        ]

    first, second = EngagementLog(tmp_path, "engagement"), EngagementLog(tmp_path, "engagement")
    assert first.follow_topic("id-a") == 0 and second.follow_topic("id-a") == 0
    assert first.append(events("a", 0, 300)) == 300 and second.append(events("a", 1, 300)) == 300
    third = EngagementLog(tmp_path, "engagement")  # started before the topic was made again
    assert third.logged_through(0) == 299
    assert first.follow_topic("id-b") == 2  # both partitions' files set aside
    assert second.follow_topic("id-b") == 0 and third.follow_topic("id-b") == 0  # already done
    assert second.logged_through(1) == -1 and third.logged_through(0) == -1
    assert second.append(events("b", 1, 500)) == 500  # new offsets below the old 299: none dropped
    assert third.append(events("b", 0, 100)) == 100
    assert second.follow_topic("id-b") == 0 and second.logged_through(1) == 499  # a later batch: as it was
    logged = EngagementLog(tmp_path, "engagement").read().column("event_id").to_pylist()
    expected = events("a", 0, 300) + events("a", 1, 300) + events("b", 1, 500) + events("b", 0, 100)
    assert sorted(logged) == sorted(e.event_id for e in expected)
