"""Kafka clients built from settings: consumers, producers, topic creation and dead letters."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, NewTopic
from kafka.errors import (
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from ranker.events import DeadLetter
from ranker.settings import KafkaSettings

log = logging.getLogger(__name__)


class _ClosedSocketRead(logging.Filter):
    """Drops kafka-python 3.0's error for a read that raced a close it had already finished: the
    transport's read task wakes after ``close()`` cleared its socket, logs an ERROR traceback
    (``'NoneType' object has no attribute 'recv'``) and aborts a connection that is already closed.
    Nothing is lost, but operators saw a traceback on some clean shutdowns. Any other transport
    error is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, AttributeError)
            and "'NoneType'" in str(exc)
            and str(record.msg).endswith("Error receiving network data closing socket")
            and any("(closed)" in str(arg) for arg in (record.args if isinstance(record.args, tuple) else ()))
        )


_TRANSPORT_LOG = logging.getLogger("kafka.net.transport")
if not any(isinstance(f, _ClosedSocketRead) for f in _TRANSPORT_LOG.filters):
    _TRANSPORT_LOG.addFilter(_ClosedSocketRead())

#: Kafka record headers, as kafka-python takes them.
Headers = Sequence[tuple[str, bytes]]
#: An output record: (topic, key, value), optionally with headers as a fourth item.
OutRecord = tuple[str, bytes | None, bytes] | tuple[str, bytes | None, bytes, Headers]


def make_consumer(
    kafka: KafkaSettings,
    group_id: str,
    topics: Sequence[str],
    max_poll_records: int,
    listener: ConsumerRebalanceListener | None = None,
) -> KafkaConsumer:
    """A group member that never auto-commits: offsets are committed only after writes land.

    It never creates a topic by asking for it (a broker would use its own default partition
    count); ``ensure_topics`` creates them. ``listener`` hears of every rebalance.
    """
    consumer = KafkaConsumer(
        group_id=group_id,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        auto_offset_reset=kafka.auto_offset_reset,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        max_poll_records=max_poll_records,
        **kafka.client_kwargs(),
    )
    _never_auto_create(consumer._cluster)
    consumer.subscribe(list(topics), listener=_FinishJoins(consumer._coordinator, listener))
    return consumer


class _FinishJoins(ConsumerRebalanceListener):
    """Passes rebalances on to ``inner``, and makes kafka-python 3.0.12 finish every join it starts.

    When the group leader rejoins only because its topics' partitions changed (they vanished
    from an emptied broker) and they come back as they were before the join completes, that
    release stops driving the join: its result is never applied, heartbeats stay off and the
    partitions stay revoked, so the consumer reads nothing, for good. Asking for a rejoin as
    the join starts keeps ``poll()`` driving it to the end. Only a flag is set here: listeners
    run inside the client's network loop.
    """

    def __init__(self, coordinator: Any, inner: ConsumerRebalanceListener | None) -> None:
        self._request_rejoin = getattr(coordinator, "request_rejoin", None)
        self._inner = inner

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self._request_rejoin is not None:
            self._request_rejoin()
        if self._inner is not None:
            self._inner.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self._inner is not None:
            self._inner.on_partitions_assigned(assigned)


def make_producer(kafka: KafkaSettings) -> KafkaProducer:
    """An acks=all producer; callers flush before committing what it carried.

    Like the consumers, it never creates a topic by sending to it: callers run ``ensure_topics``.
    """
    producer = KafkaProducer(
        acks="all",
        linger_ms=5,
        retries=5,
        max_request_size=kafka.max_request_size,
        allow_auto_create_topics=False,
        **kafka.client_kwargs(),
    )
    _never_auto_create(producer._metadata)
    return producer


def topic_id(consumer: KafkaConsumer, topic: str) -> str | None:
    """The broker's id of ``topic`` as the consumer's metadata last gave it (Kafka 2.8+ and Tansu: a new
    one each time the topic is created), or None where the broker gives none. kafka-python keeps it
    in its cluster metadata only (``topic_id``), not on the consumer's public API."""
    cluster = getattr(consumer, "_cluster", None)
    found = cluster.topic_id(topic) if cluster is not None and hasattr(cluster, "topic_id") else None
    return str(found) if found is not None and getattr(found, "int", 1) != 0 else None


def _never_auto_create(cluster: Any) -> None:
    """Make a client's metadata requests stop asking the broker to create the topics they name.

    kafka-python 3.0.12 takes ``allow_auto_create_topics`` but builds its metadata cache
    without it (``kafka/net/manager.py``), so the requests still say "create": Tansu then
    creates any missing topic it is asked about, with its default 4 partitions. The cache's
    own config is where the requests read the flag. A later release without that attribute
    is left as it is.
    """
    config = getattr(cluster, "config", None)
    if config is not None and "allow_auto_create_topics" in config:
        config["allow_auto_create_topics"] = False


#: Producer errors about the record itself: sending it again cannot succeed, so they are
#: the input's fault (dead-lettered, committed past), never an outage to retry. A refused
#: timestamp (this host's clock) or a corrupt batch (the wire) is not the record's fault:
#: those stay outages, retried until they pass.
RECORD_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidRecordError,
)


@dataclass(frozen=True)
class Refused:
    """A record the producer or broker refused for what it is (``RECORD_ERRORS``)."""

    index: int  # position in the published sequence
    error: KafkaError


def size_limits(kafka: KafkaSettings, topics: Sequence[str]) -> dict[str, int | None]:
    """The record size limits in force: the producer's, the broker's and each topic's (None: not reported).

    Logged at start-up so that a dead letter's budget can be checked against them. A broker
    that does not answer DescribeConfigs (the embedded Tansu) reports nothing; that is logged too.
    """
    limits: dict[str, int | None] = {"producer max_request_size": kafka.max_request_size}
    try:
        admin = KafkaAdminClient(**kafka.client_kwargs())
    except KafkaError as exc:
        log.info("record size limits: the broker could not be asked (%s)", exc)
        return limits
    try:
        wanted = [("topic", t, "max.message.bytes") for t in dict.fromkeys(topics)]
        wanted.append(("broker", str(_any_broker_id(admin)), "message.max.bytes"))
        described = admin.describe_configs(
            [ConfigResource(kind.upper(), name) for kind, name, _ in wanted], config_filter="all"
        )
        for kind, name, key in wanted:
            entry = (described.get(kind) or {}).get(name, {}).get(key)
            value = entry.get("value") if isinstance(entry, dict) else entry
            limits[f"{kind} {name} {key}" if kind == "topic" else f"broker {key}"] = _int(value)
    except Exception as exc:  # an admin API the broker lacks: only the producer's limit is known
        log.info("record size limits: the broker did not describe its configs (%s: %s)", type(exc).__name__, exc)
    finally:
        admin.close()
    return limits


def _any_broker_id(admin: KafkaAdminClient) -> int:
    brokers = admin.describe_cluster().get("brokers") or [{}]
    return int(brokers[0].get("broker_id", brokers[0].get("node_id", 0)))


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def log_size_limits(kafka: KafkaSettings, topics: Sequence[str]) -> int:
    """Log the size limits in force and return the smallest one reported (what a record must fit)."""
    limits = size_limits(kafka, topics)
    known = {k: v for k, v in limits.items() if v is not None}
    smallest = min(known.values())
    log.info(
        "record size limits (bytes): %s%s; dead letters embed at most %d bytes of the original",
        ", ".join(f"{k}={v}" for k, v in known.items()),
        "".join(f", {k} not reported" for k, v in limits.items() if v is None),
        kafka.dead_letter_original_bytes,
    )
    # The original travels as text while its JSON escaping at most doubles it, else as base64 (4/3):
    # at most twice the budget, plus a few KB of the letter's other fields.
    if kafka.dead_letter_original_bytes * 2 + 4096 > smallest:
        log.warning(
            "kafka.dead_letter_original_bytes=%d may not fit the smallest record limit (%d bytes); "
            "letters that do not fit are sent without their original",
            kafka.dead_letter_original_bytes,
            smallest,
        )
    return smallest


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
        t.songs_retry,
        t.songs_deleted,
        t.feeds_served,
    ]


class Publisher:
    """A producer that sends a batch, flushes, and rebuilds itself after a failure.

    kafka-python's producer can enter a fatal state (for instance when a restarted broker
    refuses its producer id); throwing it away is the only way out, and the caller's retry
    then resends the whole batch on a fresh one. A fresh producer first recreates the batch's
    topics that are missing (``kafka.auto_create_topics``): an emptied broker has none, and the
    producer would otherwise wait for them until it times out.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._producer: KafkaProducer | None = None

    def publish(self, records: Sequence[OutRecord], timeout_s: float = 30.0) -> list[Refused]:
        """Send and flush ``records``; return those refused for what they are (too large, invalid).

        Any other failure is an outage: it raises, and the caller retries the whole batch.
        """
        if self._producer is None:
            if self.kafka.auto_create_topics and records:
                created = ensure_topics(self.kafka, [r[0] for r in records])
                if created:
                    log.warning("created missing topics before publishing: %s", ", ".join(created))
            self._producer = make_producer(self.kafka)
        producer = self._producer
        refused: list[Refused] = []
        try:
            futures: list[tuple[int, object]] = []
            for i, record in enumerate(records):
                topic, key, value = record[0], record[1], record[2]
                headers = list(record[3]) if len(record) > 3 else None
                try:
                    futures.append((i, producer.send(topic, key=key, value=value, headers=headers)))
                except RECORD_ERRORS as exc:  # kafka-python checks max_request_size in send()
                    refused.append(Refused(i, exc))
            producer.flush(timeout=timeout_s)
            for i, fut in futures:
                error = _failure(fut)
                if error is None:
                    continue
                if not isinstance(error, RECORD_ERRORS):
                    raise error
                refused.append(Refused(i, error))
        except KafkaError:
            self.reset()
            raise
        return sorted(refused, key=lambda r: r.index)

    def reset(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


def dead_letter_record(topic: str, letter: DeadLetter) -> OutRecord:
    return topic, letter.key.encode() if letter.key is not None else None, letter.to_bytes()


def publish_outputs(
    publisher: Publisher,
    records: Sequence[OutRecord],
    letters: Sequence[DeadLetter],
    dead_letter_topic: str,
    fallbacks: Mapping[int, DeadLetter] | None = None,
) -> int:
    """Publish a batch's outputs and its dead letters so that no record can block the batch.

    A dead letter refused for its size is sent again without its original (its length and
    sha256 still identify it); a record refused that has a fallback (``fallbacks[i]`` for
    ``records[i]``: a retry's dead letter) sends that letter instead, so it is not lost; any
    record still refused is logged and dropped, since retrying cannot change the answer.
    Outages raise as usual. Returns how many were dropped.
    """
    out = list(records) + [dead_letter_record(dead_letter_topic, d) for d in letters]
    refused = publisher.publish(out)
    if not refused:
        return 0
    n_records = len(records)
    retry: list[DeadLetter] = []
    dropped = 0
    for r in refused:
        if r.index < n_records and fallbacks and r.index in fallbacks:
            log.error("record refused by Kafka (%s); sending its dead letter instead", type(r.error).__name__)
            retry.append(fallbacks[r.index].without_original())
        elif r.index >= n_records and letters[r.index - n_records].original:
            retry.append(letters[r.index - n_records].without_original())
        else:
            dropped += _drop(out[r.index], r.error)
    if retry:
        again = [dead_letter_record(dead_letter_topic, d) for d in retry]
        for r in publisher.publish(again):
            dropped += _drop(again[r.index], r.error)
    return dropped


def _drop(record: OutRecord, error: KafkaError) -> int:
    topic, key, value = record[0], record[1], record[2]
    log.error(
        "record refused by Kafka and dropped (retrying cannot help): topic %s, key %r, %d bytes: %s: %s",
        topic,
        (key or b"")[:128],
        len(value),
        type(error).__name__,
        error,
    )
    return 1


def _failure(future: object) -> KafkaError | None:
    """The error of a failed send future, as a KafkaError; None when it succeeded."""
    exc = getattr(future, "exception", None)
    if not getattr(future, "failed", lambda: False)() or exc is None:
        return None
    return exc if isinstance(exc, KafkaError) else KafkaError(str(exc))


def flush_or_raise(producer: KafkaProducer, futures: Sequence[object], timeout_s: float = 30.0) -> None:
    """Flush and surface any failed send, so the caller does not commit what did not land."""
    producer.flush(timeout=timeout_s)
    for fut in futures:
        exc = _failure(fut)
        if exc is not None:
            raise exc
