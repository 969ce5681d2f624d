"""What ``DELETE /v1/songs/{id}`` needs beside the store: the admin token check and the ``songs.deleted`` publisher.

The API publishes ``songs.deleted`` itself (the workers remove the vectors from it) with a
kafka-python producer made on the first takedown, so an API process that never takes a song
down never connects to Kafka. (``ranker`` cannot use the consumers' publisher: the layers
forbid it.) The topic is created first when ``kafka.auto_create_topics`` is on. With Kafka
unreachable, a takedown answers 503 after about ``kafka.request_timeout_ms``, not kafka-python's
30 s bootstrap wait.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr

from ranker.events import SongDeleted
from ranker.settings import KafkaSettings


def token_matches(given: str | None, tokens: Sequence[SecretStr]) -> bool:
    """Whether ``given`` is one of ``tokens``, compared with every one (the time says nothing about which)."""
    raw = (given or "").encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(raw, token.get_secret_value().encode())
    return ok and given is not None


class DeletedPublisher:
    """Publishes ``songs.deleted`` events, acks=all, flushed before returning; thread safe."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float = 30.0) -> None:
        self.kafka = kafka
        self.topic = kafka.topics.songs_deleted
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._producer: Any = None

    def _ensure_topic(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_timeout_ms=self.kafka.request_timeout_ms, **self.kafka.client_kwargs())
        try:
            if self.topic not in set(admin.list_topics()):
                t = self.kafka.topics
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(self.topic, t.partitions, t.replication_factor)])
        finally:
            admin.close()

    def publish(self, events: Sequence[SongDeleted]) -> None:
        """Send and flush; raises (and drops the producer, to be made again) on any Kafka failure."""
        from kafka import KafkaProducer

        with self._lock:
            try:
                if self._producer is None:
                    if self.kafka.auto_create_topics:
                        self._ensure_topic()
                    self._producer = KafkaProducer(
                        acks="all",
                        retries=5,
                        bootstrap_timeout_ms=self.kafka.request_timeout_ms,
                        max_block_ms=self.kafka.request_timeout_ms,
                        **self.kafka.client_kwargs(),
                    )
                futures = [self._producer.send(self.topic, key=e.song_id.encode(), value=e.to_bytes()) for e in events]
                self._producer.flush(timeout=self.timeout_s)
                for future in futures:
                    future.get(timeout=self.timeout_s)
            except Exception:
                self._drop()
                raise

    def _drop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):  # already failing: the first error is the one to report
                producer.close(timeout=1)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None
