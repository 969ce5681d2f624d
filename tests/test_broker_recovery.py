"""The worker recovers from an emptied broker without losing what Redis and the embedding store hold.

A memory-mode broker that restarts comes back with no topics, no records and no committed
offsets. The test runs on a private stack, so restarting its broker never touches the session's:

1. A worker scores songs and stops.
2. The broker restarts empty.
3. The scored songs are still ranked in Redis and served by the API, including similar songs
   from the embedding store.
4. A worker started again recreates the topics and scores the songs published after the
   restart, each exactly once.

A worker kept running through the restart is not covered: with this broker it can miss the
first songs after the restart (docs/broker.md, "Known gap").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kafka.admin import KafkaAdminClient

from consumers.publish import publish_events
from consumers.stack import EmbeddedStack
from consumers.worker import Worker
from ranker.events import SongGenerated
from ranker.serving.api import create_app
from ranker.settings import Settings
from tests.helpers import read_topic
from tests.test_durable_broker import private_settings
from tests.test_faults import assert_exactly_once, committed_total, fast_retry, running_worker, songs, wait_for
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


def topics_on_broker(settings: Settings) -> set[str]:
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def score(s: Settings, events: list[SongGenerated]) -> None:
    publish_events(s, events)
    wait_for("songs before the restart", lambda: len(feed(s)) == len(events))
    wait_for("their commit", lambda: committed_total(s) == len(events))


def empty_the_broker(stack: EmbeddedStack, s: Settings) -> None:
    stack.stop_one("kafka")
    stack.up()
    assert s.kafka.topics.songs_generated not in topics_on_broker(s), "the broker was not emptied"


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
    topics = s.kafka.topics
    assert {topics.songs_generated, topics.songs_scored} <= topics_on_broker(s)
    rescored = {m.key.decode() for m in read_topic(s, topics.songs_scored, expect=len(after))}
    assert rescored == set(after_ids), "songs.scored after the restart holds exactly the new songs"


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
