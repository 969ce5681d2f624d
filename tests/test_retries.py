"""Transient fetch failures: retried with backoff through the retry topic, then dead-lettered, then replayed.

On the real embedded broker and Redis, with a loopback HTTP server as the audio source whose
answer per song the test sets: HTTP 503 for the first N requests, or always until fixed.
Backoffs are tenths of a second, except where a retry must still be waiting.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from consumers.dead_letters import cmd_replay
from consumers.loop import Message
from consumers.publish import publish_events
from consumers.retries import ATTEMPTS, NOT_BEFORE_MS, ORIGIN, RetryPauses, RetryPolicy, RetryState
from consumers.worker import Worker
from indexes import ScoreStore
from ranker.errors import ErrorCode, InputError
from ranker.events import DeadLetter
from ranker.settings import AudioSettings, Settings, WorkerSettings
from tests.helpers import ALWAYS, AudioServer, audio_server, event, wait_for


@pytest.fixture
def audio(tmp_path: Path) -> Iterator[AudioServer]:
    with audio_server(tmp_path) as server:
        yield server


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback fetches allowed; three tries, 0.3 s then 0.6 s apart."""
    return settings.model_copy(
        update={
            "audio": AudioSettings(fetch_timeout_s=3.0, allow_private_networks=True),
            "worker": WorkerSettings(
                poll_timeout_ms=200, fetch_max_attempts=3, fetch_backoff_initial_s=0.3, fetch_backoff_max_s=0.6
            ),
        }
    )


def run_worker(settings: Settings) -> Worker:
    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)
    return worker


def records(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` in (partition, offset) order, read up to the high watermarks (no group)."""
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert parts, f"{topic} does not exist"
        consumer.assign(parts)
        consumer.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend(batch)
            marks = [consumer.highwater(tp) for tp in parts]
            if all(m is not None and consumer.position(tp) >= m for tp, m in zip(parts, marks, strict=True)):
                return sorted(out, key=lambda r: (r.partition, r.offset))
        raise AssertionError(f"{topic}: not read to its high watermarks within 30 s")
    finally:
        consumer.close()


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers or ())


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"code": "http_error"}) or 0.0


def test_a_song_that_fails_twice_then_serves_is_scored_once(
    settings: Settings, audio: AudioServer, store: ScoreStore
) -> None:
    topics = settings.kafka.topics
    audio.failures["flaky"] = 2
    song = event("flaky", audio.uri("flaky"))
    scheduled = metric("apexrank_worker_fetch_retries_scheduled_total")
    publish_events(settings, [song])

    worker = run_worker(settings)

    st = worker.stats
    assert (st.scored, st.dead_letters, st.retries_scheduled, st.retries_exhausted) == (1, 0, 2, 0)
    assert len(audio.hits["flaky"]) == 3
    assert metric("apexrank_worker_fetch_retries_scheduled_total") == scheduled + 2
    assert store.get_song("flaky") is not None
    assert [r.key for r in records(settings, topics.songs_scored)] == [b"flaky"]
    assert records(settings, topics.dead_letter) == []

    # Each retry carries the original event and key, its try count and where the event came from ...
    (source,) = records(settings, topics.songs_generated)
    retries = records(settings, topics.songs_retry)
    assert [headers(r)[ATTEMPTS] for r in retries] == [b"1", b"2"]
    assert all(r.key == b"flaky" and r.value == song.to_bytes() for r in retries)
    origin = f"{topics.songs_generated}/{source.partition}/{source.offset}".encode()
    assert {headers(r)[ORIGIN] for r in retries} == {origin}
    # ... and was not tried before its not-before time (a lower bound).
    for retry, hit in zip(retries, audio.hits["flaky"][1:], strict=True):
        assert hit >= int(headers(retry)[NOT_BEFORE_MS]) / 1000


def test_a_song_that_always_fails_is_dead_lettered_after_n_attempts_then_replayed_once(
    settings: Settings, audio: AudioServer, store: ScoreStore, capsys: pytest.CaptureFixture[str]
) -> None:
    topics = settings.kafka.topics
    n = settings.worker.fetch_max_attempts
    audio.failures["down"] = ALWAYS
    song = event("down", audio.uri("down"))
    exhausted = metric("apexrank_worker_fetch_retries_exhausted_total")
    publish_events(settings, [song])

    worker = run_worker(settings)

    st = worker.stats
    assert (st.scored, st.dead_letters, st.retries_scheduled, st.retries_exhausted) == (0, 1, n - 1, 1)
    assert len(audio.hits["down"]) == n
    assert metric("apexrank_worker_fetch_retries_exhausted_total") == exhausted + 1
    (raw,) = records(settings, topics.dead_letter)
    letter = DeadLetter.model_validate_json(raw.value)
    assert letter.key == "down" and letter.error_code == "http_error"
    assert "503" in letter.message and f"gave up after {n} attempts" in letter.message
    assert letter.source_topic == topics.songs_generated  # the original's, not the retry topic's
    assert letter.original_bytes() == song.to_bytes()
    assert store.get_song("down") is None

    # The fix, then the replay: the song is scored once, and no second dead letter appears.
    audio.failures["down"] = 0
    args = argparse.Namespace(topic="songs", code=["http_error"], since="1h", json=True, dry_run=False)
    capsys.readouterr()
    assert cmd_replay(settings, args) == 0
    (report,) = json.loads(capsys.readouterr().out)["topics"]
    assert report["republished"] == 1

    worker = run_worker(settings)

    st = worker.stats
    assert (st.scored, st.dead_letters, st.retries_scheduled) == (1, 0, 0)
    assert len(audio.hits["down"]) == n + 1
    assert store.get_song("down") is not None
    assert [r.key for r in records(settings, topics.songs_scored)] == [b"down"]
    assert len(records(settings, topics.dead_letter)) == 1


def test_a_retried_song_that_then_fails_for_good_is_dead_lettered_at_once(
    settings: Settings, audio: AudioServer
) -> None:
    """A 404 on the second try is permanent: no third try, and the letter names the original record."""
    topics = settings.kafka.topics
    audio.failures["removed"] = 1
    audio.gone.add("removed")
    publish_events(settings, [event("removed", audio.uri("removed"))])

    worker = run_worker(settings)

    st = worker.stats
    assert (st.scored, st.dead_letters, st.retries_scheduled, st.retries_exhausted) == (0, 1, 1, 0)
    assert len(audio.hits["removed"]) == 2
    (source,) = records(settings, topics.songs_generated)
    (letter,) = [DeadLetter.model_validate_json(r.value) for r in records(settings, topics.dead_letter)]
    assert "404" in letter.message and "gave up" not in letter.message
    assert (letter.source_topic, letter.partition, letter.offset) == (
        topics.songs_generated,
        source.partition,
        source.offset,
    )


def test_a_waiting_retry_does_not_hold_back_later_songs(
    settings: Settings, audio: AudioServer, store: ScoreStore
) -> None:
    topics = settings.kafka.topics
    # One retry, due in a minute: it must still be waiting when the later song is scored.
    settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"fetch_backoff_initial_s": 60.0, "fetch_backoff_max_s": 60.0})
        }
    )
    audio.failures["early"] = ALWAYS
    worker = Worker(settings)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        publish_events(settings, [event("early", audio.uri("early"))])
        wait_for("the retry to be read and held", lambda: worker.retry_pauses.waiting)
        publish_events(settings, [event("later", audio.uri("later"))])
        wait_for("the later song", lambda: store.get_song("later") is not None)
        assert worker.retry_pauses.waiting, "the retry stopped waiting before its time"
        assert len(audio.hits["early"]) == 1 and store.get_song("early") is None
        assert worker.stats.retries_scheduled == 1 and worker.stats.dead_letters == 0
    finally:
        worker.request_stop()
        thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors

    # The waiting retry was never committed past: a restarted worker reads it again.
    (retry,) = records(settings, topics.songs_retry)
    consumer = KafkaConsumer(group_id=settings.kafka.worker_group_id, **settings.kafka.client_kwargs())
    try:
        committed = consumer.committed(TopicPartition(topics.songs_retry, retry.partition))
    finally:
        consumer.close()
    assert committed is None or committed <= retry.offset


def test_backoff_doubles_up_to_its_cap_and_bad_headers_read_as_a_first_try(settings: Settings) -> None:
    policy = RetryPolicy(settings)
    assert [policy.backoff_s(k) for k in (1, 2, 3, 4)] == [0.3, 0.6, 0.6, 0.6]
    garbage = Message("t.retry", 1, 7, b"k", b"{}", ((ATTEMPTS, b"many"), (NOT_BEFORE_MS, b"soon"), (ORIGIN, b"?")))
    assert RetryState.of(garbage) == RetryState(0, 0.0, ("t.retry", 1, 7))
    # A not-before from a skewed clock or a foreign producer waits at most the longest backoff.
    pauses = RetryPauses("t.retry", max_wait_s=0.6)
    far = Message("t.retry", 1, 8, b"k", b"{}", ((NOT_BEFORE_MS, str(10**15).encode()),))
    assert pauses.due_at(far, now=1000.0) == 1000.6
    assert pauses.due_at(garbage, now=1000.0) == 0.0
    # A retry's plan carries the original's coordinates; the last try becomes a dead letter naming them.
    error = InputError(ErrorCode.HTTP_ERROR, "HTTP 503", transient=True)
    first = policy.plan([(Message("t.gen", 0, 5, b"k", b"{}"), error)], now=1000.0)
    ((_, key, value, sent),) = first.retries  # type: ignore[misc]
    assert (key, value) == (b"k", b"{}")
    retry = Message("t.retry", 1, 9, b"k", b"{}", tuple(sent))
    assert RetryState.of(retry) == RetryState(1, 1000.3, ("t.gen", 0, 5))
    last = policy.plan([(Message("t.retry", 1, 9, b"k", b"{}", ((ATTEMPTS, b"2"), *sent[1:])), error)])
    assert not last.retries
    (letter,) = last.exhausted
    assert (letter.source_topic, letter.partition, letter.offset) == ("t.gen", 0, 5)
    assert "gave up after 3 attempts" in letter.message
