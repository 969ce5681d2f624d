"""Poison messages on the real embedded broker: nothing blocks a partition, nothing is lost.

A message whose dead letter would be too large for Kafka once stopped both consumers for good
(the letter embedded the whole original, escaped). Now a dead letter embeds a bounded head of
the original with its full length and sha256, a record Kafka refuses for what it is is never
retried as an outage, and the consumer commits past it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from consumers.cli import build_parser
from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, publish_outputs
from consumers.worker import Worker
from ranker.errors import ErrorCode, InputError
from ranker.events import DeadLetter, Engagement, SongGenerated
from ranker.settings import Settings
from tests.helpers import event, read_topic, tone

POISON = b"\x01" * 2_000_000  # valid UTF-8, six times larger once JSON-escaped


def _produce(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Send ``(key, value)`` records to partition 0, in order, with room for a 2 MB poison."""
    producer = KafkaProducer(max_request_size=8 * 1024 * 1024, acks="all", **settings.kafka.client_kwargs())
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value, partition=0).get(timeout=30)
    finally:
        producer.close()


def _committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic}


def _letters(settings: Settings, topic: str, expect: int) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(m.value) for m in read_topic(settings, topic, expect)]


def _check_bounded(letter: DeadLetter, original: bytes, budget: int) -> None:
    assert letter.schema_version == 2
    assert letter.original_length == len(original)
    assert letter.original_sha256 == hashlib.sha256(original).hexdigest()
    assert letter.original_truncated
    assert original.startswith(letter.original_bytes())
    assert 0 < len(letter.original_bytes()) <= budget
    assert len(letter.to_bytes()) < 2 * budget + 4096


def test_a_2mb_poison_does_not_block_the_worker(settings: Settings, tmp_path: Path) -> None:
    topics = settings.kafka.topics
    ensure_topics(settings.kafka, [topics.songs_generated])
    valid = event("after-poison", tone(tmp_path / "a.wav").as_uri())
    _produce(settings, topics.songs_generated, [(b"poison", POISON), (b"after-poison", valid.to_bytes())])

    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)

    assert worker.stats.scored == 1 and worker.stats.dead_letters == 1
    assert worker.store.get_song("after-poison") is not None
    (letter,) = _letters(settings, topics.dead_letter, 1)
    assert letter.error_code == ErrorCode.INVALID_JSON and letter.offset == 0
    _check_bounded(letter, POISON, settings.kafka.dead_letter_original_bytes)
    assert _committed(settings, settings.kafka.worker_group_id, topics.songs_generated)[0] == 2


def test_a_2mb_poison_does_not_block_the_engagement_consumer(settings: Settings) -> None:
    topics = settings.kafka.topics
    ensure_topics(settings.kafka, [topics.engagement])
    like = Engagement(event_id="e-1", song_id="s-1", user_id="u-1", type="like", ts=datetime.now(UTC))
    _produce(settings, topics.engagement, [(b"s-0", POISON), (b"s-1", like.to_bytes())])

    consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
    stats = consumer.run(until_idle_s=2.0, until_caught_up=True)

    assert stats.accepted == 1 and stats.dead_letters == 1
    (letter,) = _letters(settings, topics.engagement_dead_letter, 1)
    assert letter.error_code == ErrorCode.INVALID_JSON
    _check_bounded(letter, POISON, settings.kafka.dead_letter_original_bytes)
    assert _committed(settings, settings.kafka.feedback_group_id, topics.engagement)[0] == 2


def test_a_letter_too_large_even_truncated_goes_without_its_original(settings: Settings, tmp_path: Path) -> None:
    """A budget above the producer's limit: the refused letter is sent again with no original."""
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"dead_letter_original_bytes": 3_000_000})}
    )
    topics = settings.kafka.topics
    ensure_topics(settings.kafka, [topics.songs_generated])
    valid = event("after-big", tone(tmp_path / "b.wav").as_uri())
    _produce(settings, topics.songs_generated, [(b"big", POISON), (b"after-big", valid.to_bytes())])

    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)

    assert worker.stats.scored == 1
    (letter,) = _letters(settings, topics.dead_letter, 1)
    assert letter.original == "" and letter.original_truncated
    assert letter.original_length == len(POISON)
    assert letter.original_sha256 == hashlib.sha256(POISON).hexdigest()
    assert _committed(settings, settings.kafka.worker_group_id, topics.songs_generated)[0] == 2


def test_publish_outputs_reports_what_kafka_refused(settings: Settings) -> None:
    """Records refused for their size are dropped and counted, never raised as an outage."""
    from consumers.kafka_io import Publisher

    topic = settings.kafka.topics.songs_scored
    ensure_topics(settings.kafka, [topic])
    publisher = Publisher(settings.kafka)
    try:
        dropped = publish_outputs(publisher, [(topic, b"k", b"x" * 2_000_000), (topic, b"k2", b"{}")], [], "unused")
    finally:
        publisher.close()
    assert dropped == 1
    assert [m.value for m in read_topic(settings, topic, 1)] == [b"{}"]


def test_a_retry_record_kafka_refuses_goes_as_its_dead_letter(settings: Settings) -> None:
    """A transient failure's retry record that Kafka refuses is not lost: its dead letter goes instead."""
    from consumers.kafka_io import Publisher
    from consumers.loop import Message, dead_letter

    topics = settings.kafka.topics
    ensure_topics(settings.kafka, [topics.songs_retry, topics.dead_letter])
    letter = dead_letter(Message(topics.songs_generated, 0, 3, b"big", POISON), ErrorCode.HTTP_ERROR, "HTTP 503")
    retry = (topics.songs_retry, b"big", POISON, [("apexrank-attempts", b"1")])
    publisher = Publisher(settings.kafka)
    try:
        dropped = publish_outputs(publisher, [retry], [], topics.dead_letter, {0: letter})
    finally:
        publisher.close()
    assert dropped == 0
    (sent,) = _letters(settings, topics.dead_letter, 1)
    assert (sent.key, sent.error_code, sent.source_topic, sent.offset) == (
        "big",
        "http_error",
        topics.songs_generated,
        3,
    )
    assert sent.original_length == len(POISON) and sent.original_sha256 == hashlib.sha256(POISON).hexdigest()


def test_created_at_and_key_are_checked_at_ingest(settings: Settings, tmp_path: Path) -> None:
    topics = settings.kafka.topics
    ensure_topics(settings.kafka, [topics.songs_generated])
    uri = tone(tmp_path / "c.wav").as_uri()
    now = datetime.now(UTC)
    future = event("future", uri).model_copy(update={"created_at": datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)})
    skewed_ok = event("skew-ok", uri).model_copy(update={"created_at": now + timedelta(seconds=60)})
    ancient = event("ancient", uri).model_copy(update={"created_at": datetime(1978, 1, 11, tzinfo=UTC)})
    as_number = json.loads(event("number", uri).to_bytes())
    as_number["created_at"] = 253402300799
    mismatch = event("mine", uri)
    no_key = event("no-key", uri)
    _produce(
        settings,
        topics.songs_generated,
        [
            (b"future", future.to_bytes()),
            (b"skew-ok", skewed_ok.to_bytes()),
            (b"ancient", ancient.to_bytes()),
            (b"number", json.dumps(as_number).encode()),
            (b"someone-else", mismatch.to_bytes()),
            (None, no_key.to_bytes()),
        ],
    )

    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)

    letters = {d.key: d for d in _letters(settings, topics.dead_letter, 4)}
    assert {k: d.error_code for k, d in letters.items()} == {
        "future": ErrorCode.INVALID_CREATED_AT,
        "ancient": ErrorCode.INVALID_CREATED_AT,
        "number": ErrorCode.INVALID_CREATED_AT,
        "someone-else": ErrorCode.KEY_MISMATCH,
    }
    assert "in the future" in letters["future"].message
    assert "RFC 3339" in letters["number"].message
    assert worker.stats.scored == 2
    assert worker.store.get_song("skew-ok") is not None and worker.store.get_song("no-key") is not None


@pytest.mark.parametrize(
    ("raw", "encoding", "truncated"),
    [
        (b'{"a": 1}', "utf-8", False),
        ("é".encode() * 40, "utf-8", True),  # cut inside a character: the partial tail is dropped
        (b"\x00\x01\x02" * 30, "base64", True),  # control bytes would grow six-fold as JSON text
        (bytes(range(256)), "base64", True),  # not UTF-8
    ],
)
def test_dead_letter_original_is_bounded(raw: bytes, encoding: str, truncated: bool) -> None:
    letter = DeadLetter.build(
        raw, key=b"k", topic="t", partition=0, offset=1, code="x", message="m", max_original_bytes=61
    )
    assert letter.original_encoding == encoding and letter.original_truncated is truncated
    assert raw.startswith(letter.original_bytes()) and len(letter.original_bytes()) <= 61
    assert letter.original_length == len(raw) and letter.original_sha256 == hashlib.sha256(raw).hexdigest()
    if encoding == "base64":
        assert base64.b64decode(letter.original) == raw[:61]


def test_version_1_dead_letters_still_parse() -> None:
    v1 = {
        "schema_version": 1,
        "original": "x",
        "original_encoding": "utf-8",
        "key": None,
        "source_topic": "t",
        "partition": 0,
        "offset": 0,
        "error_code": "invalid_json",
        "message": "m",
        "failed_at": "2026-01-01T00:00:00Z",
    }
    letter = DeadLetter.model_validate_json(json.dumps(v1))
    assert letter.schema_version == 1 and letter.original_length is None


def test_metrics_listen_on_loopback_by_default() -> None:
    parser = build_parser()
    for command in ("worker", "feedback"):
        assert parser.parse_args([command, "--metrics-port", "9100"]).metrics_host == "127.0.0.1"
    assert parser.parse_args(["worker", "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"


def test_until_caught_up_is_off_unless_asked() -> None:
    parser = build_parser()
    for command in ("worker", "feedback"):
        assert parser.parse_args([command]).until_caught_up is False
        assert parser.parse_args([command, "--until-caught-up"]).until_caught_up is True


@pytest.mark.parametrize("value", ["1700000000000", "1700000000", "20260101"])
def test_created_at_digit_strings_are_not_guessed_to_be_epoch_time(value: str) -> None:
    raw = json.dumps({"song_id": "s", "audio_uri": "file:///x.wav", "generator": "g", "created_at": value}).encode()
    with pytest.raises(InputError) as info:
        SongGenerated.parse(raw)
    assert info.value.code == ErrorCode.INVALID_CREATED_AT and "RFC 3339" in info.value.message
