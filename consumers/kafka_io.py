"""Kafka clients built from settings: consumers, producers, topic creation and dead letters."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ranker.events import DeadLetter
from ranker.settings import KafkaSettings

log = logging.getLogger(__name__)


def make_consumer(kafka: KafkaSettings, group_id: str, topics: Sequence[str], max_poll_records: int) -> KafkaConsumer:
    """A group member that never auto-commits: offsets are committed only after writes land."""
    consumer = KafkaConsumer(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        max_poll_records=max_poll_records,
        **kafka.client_kwargs(),
    )
    consumer.subscribe(list(topics))
    return consumer


def make_producer(kafka: KafkaSettings) -> KafkaProducer:
    """An acks=all producer; callers flush before committing what it carried."""
    return KafkaProducer(acks="all", linger_ms=5, retries=5, **kafka.client_kwargs())


def ensure_topics(kafka: KafkaSettings, names: Iterable[str]) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        new = [
            NewTopic(
                name,
                num_partitions=kafka.topics.partitions,
                replication_factor=kafka.topics.replication_factor,
            )
            for name in missing
        ]
        with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won the race
            admin.create_topics(new)
        return missing
    finally:
        admin.close()


def all_topics(kafka: KafkaSettings) -> list[str]:
    t = kafka.topics
    return [
        t.songs_generated,
        t.songs_scored,
        t.dead_letter,
        t.engagement,
        t.engagement_dead_letter,
        t.models_promoted,
    ]


class Publisher:
    """A producer that sends a batch, flushes, and rebuilds itself after a failure.

    kafka-python's producer can enter a fatal state (for instance when a restarted broker
    refuses its producer id); throwing it away is the only way out, and the caller's retry
    then resends the whole batch on a fresh one.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._producer: KafkaProducer | None = None

    def publish(self, records: Sequence[tuple[str, bytes | None, bytes]], timeout_s: float = 30.0) -> None:
        if self._producer is None:
            self._producer = make_producer(self.kafka)
        producer = self._producer
        try:
            futures = [producer.send(topic, key=key, value=value) for topic, key, value in records]
            flush_or_raise(producer, futures, timeout_s)
        except KafkaError:
            self.reset()
            raise

    def reset(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


def dead_letter_record(topic: str, letter: DeadLetter) -> tuple[str, bytes | None, bytes]:
    return topic, letter.key.encode() if letter.key is not None else None, letter.to_bytes()


def flush_or_raise(producer: KafkaProducer, futures: Sequence[object], timeout_s: float = 30.0) -> None:
    """Flush and surface any failed send, so the caller does not commit what did not land."""
    producer.flush(timeout=timeout_s)
    for fut in futures:
        exc = getattr(fut, "exception", None)
        if getattr(fut, "failed", lambda: False)() and exc is not None:
            raise exc if isinstance(exc, KafkaError) else KafkaError(str(exc))
