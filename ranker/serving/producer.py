"""The API process's one Kafka producer: takedowns (``songs.deleted``), HTTP events (``engagement``) and
whatever else the API publishes, each record answered for on its own.

It connects on the first publish, so an API process that never publishes never connects to Kafka
(``ranker`` cannot use the consumers' publisher: the layers forbid it). A topic is created before
its first record when ``kafka.auto_create_topics`` is on. Records are sent with acks=all and
flushed before :meth:`ApiProducer.publish` returns; with Kafka unreachable it returns after about
``kafka.request_timeout_ms`` per step (connect, metadata, delivery), not kafka-python's 30 s
bootstrap wait or 2 min delivery timeout. A record is acknowledged only when the broker said so;
everything else is reported, never dropped in silence.

Connecting is one attempt at a time. When one fails, the publishes that waited for it, and those
that come within :data:`RECONNECT_BACKOFF_S` after it, fail at once with its error: during an
outage each takedown, event post or served-log batch waits out at most about one attempt, not one
per publish queued before it (they took the request threads with them).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ranker.settings import KafkaSettings

log = logging.getLogger(__name__)

#: A record to publish: (key, value). The key picks the partition (the song id, as the consumers do).
Record = tuple[bytes | None, bytes]

#: Seconds after a failed connection attempt in which publishes fail with its error instead of
#: trying again; under the events' Retry-After (5 s), so a client's retry meets a fresh attempt.
RECONNECT_BACKOFF_S = 2.0


@dataclass(frozen=True)
class Delivery:
    """What became of one record: acknowledged by the broker (``error`` is None, with its partition
    and offset), or not, with why and whether a later retry can help (``permanent``: refused for
    what it is)."""

    error: str | None = None
    permanent: bool = False
    partition: int | None = None
    offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Unavailable(Exception):
    """A recent connection attempt failed (the message is its error): this publish was not tried."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _failed(exc: BaseException) -> Delivery:
    """A record that failed; ``permanent`` for kafka-python's errors about the record itself."""
    from kafka.errors import InvalidRecordError, MessageSizeTooLargeError, RecordListTooLargeError

    record_error = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError)
    return Delivery(_describe(exc), permanent=isinstance(exc, record_error))


class ApiProducer:
    """One acks=all kafka-python producer for the whole API process; thread safe.

    Sends and flushes run concurrently from many request threads (kafka-python's producer is
    thread safe); only connecting and creating topics take the lock. After an outage the
    producer is thrown away (kafka-python can be left in a fatal state) and the next publish
    makes a fresh one. ``attempts`` counts the connection attempts made (topic creation included).
    """

    def __init__(self, kafka: KafkaSettings, *, backoff_s: float = RECONNECT_BACKOFF_S) -> None:
        self.kafka = kafka
        self.timeout_s = kafka.request_timeout_ms / 1000
        self.backoff_s = backoff_s
        self.attempts = 0
        self._lock = threading.Lock()
        self._producer: Any = None
        self._topics: set[str] = set()  # created (or found) for the current producer
        self._failed: tuple[float, str] | None = None  # the last failed attempt: when it ended, its error
        self._closed = False

    def publish(self, topic: str, records: Sequence[Record]) -> list[Delivery]:
        """Send ``records`` to ``topic``, flush, and say for each whether the broker acknowledged it.

        Never raises for Kafka: an outage fails every record not acknowledged, a record refused for
        what it is fails alone (``permanent``). The answer is in ``records``' order.
        """
        if not records:
            return []
        try:
            producer = self._connect(topic)
        except Unavailable as exc:  # the failed attempt was logged; one line per attempt, not per publish
            return [Delivery(str(exc))] * len(records)
        except Exception as exc:  # kafka-python raises several types while connecting; all mean "not sent"
            log.warning("Kafka producer unavailable for %s: %s", topic, _describe(exc))
            return [Delivery(_describe(exc))] * len(records)
        out: list[Delivery | None] = [None] * len(records)
        futures: list[tuple[int, Any]] = []
        outage: BaseException | None = None
        for i, (key, value) in enumerate(records):
            try:
                futures.append((i, producer.send(topic, key=key, value=value)))
            except Exception as exc:  # checked in send(): too large, no metadata within max_block_ms, closed
                out[i] = failed = _failed(exc)
                if not failed.permanent:
                    outage = exc
                    break  # every further send would wait max_block_ms for the same reason
        try:
            producer.flush(timeout=self.timeout_s)
        except Exception as exc:  # KafkaTimeoutError: some records are still unacknowledged
            outage = outage or exc
        for i, future in futures:
            if future.succeeded():
                meta = future.value
                out[i] = Delivery(partition=meta.partition, offset=meta.offset)
            elif future.failed():
                out[i] = failed = _failed(future.exception)
                if not failed.permanent:
                    outage = outage or future.exception
            else:
                out[i] = Delivery(f"not acknowledged within {self.timeout_s:g} s")
        if outage is not None:
            log.warning("Kafka publish to %s failed: %s", topic, _describe(outage))
            self._drop(producer)
            reason = Delivery(f"not sent: {_describe(outage)}")
            return [d if d is not None else reason for d in out]
        return [d if d is not None else Delivery("not sent") for d in out]

    def _connect(self, topic: str) -> Any:
        """The producer, made on first use, with ``topic`` created if missing (as configured);
        :class:`Unavailable` while a failed attempt is fresh (see the module's docstring)."""
        asked = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("the API's producer is closed")
            if self._producer is not None and topic in self._topics:
                return self._producer
            if self._failed is not None:
                ended, error = self._failed
                # ended after this publish asked: it waited on that attempt, and another would fail alike
                if ended >= asked or time.monotonic() - ended < self.backoff_s:
                    raise Unavailable(error)
            self.attempts += 1
            try:
                producer = self._attempt(topic)
            except Exception as exc:
                self._failed = (time.monotonic(), _describe(exc))
                raise
            self._failed = None
            return producer

    def _attempt(self, topic: str) -> Any:
        """Make the producer if there is none, and create ``topic`` if configured; under the lock."""
        if self._producer is None:
            from kafka import KafkaProducer

            self._topics.clear()
            self._producer = KafkaProducer(
                acks="all",
                retries=5,
                bootstrap_timeout_ms=self.kafka.request_timeout_ms,
                max_block_ms=self.kafka.request_timeout_ms,
                delivery_timeout_ms=self.kafka.request_timeout_ms,  # at least linger (0) + request timeout
                max_request_size=self.kafka.max_request_size,
                **self.kafka.client_kwargs(),
            )
            if self._closed:  # closed while this thread connected: nobody else will close this one
                made, self._producer = self._producer, None
                with contextlib.suppress(Exception):
                    made.close(timeout=1)
                raise RuntimeError("the API's producer was closed while it connected")
        if topic not in self._topics:
            if self.kafka.auto_create_topics:
                self._ensure_topic(topic)
            self._topics.add(topic)
        return self._producer

    def _ensure_topic(self, topic: str) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_timeout_ms=self.kafka.request_timeout_ms, **self.kafka.client_kwargs())
        try:
            if topic not in set(admin.list_topics()):
                t = self.kafka.topics
                with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won the race
                    admin.create_topics([NewTopic(topic, t.partitions, t.replication_factor)])
        finally:
            admin.close()

    def _drop(self, producer: Any) -> None:
        """Throw ``producer`` away, unless another thread already replaced it."""
        with self._lock:
            if self._producer is not producer:
                return
            self._producer = None
            self._topics.clear()
        with contextlib.suppress(Exception):  # already failing: the first error is the one reported
            producer.close(timeout=1)

    def close(self) -> None:
        """Close the producer; never waits on a connect in progress (with Kafka unreachable one takes up
        to ``kafka.request_timeout_ms``, and a shutdown must fit a supervisor's grace period): the
        connecting thread finds the producer closed and drops what it made."""
        self._closed = True
        if not self._lock.acquire(timeout=1.0):
            log.warning("closing the Kafka producer while it connects: the connecting thread closes it")
            return
        try:
            producer, self._producer = self._producer, None
            self._topics.clear()
        finally:
            self._lock.release()
        if producer is not None:
            producer.close(timeout=10)
