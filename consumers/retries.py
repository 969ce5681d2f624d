"""Transient fetch failures: retried with backoff through a retry topic, then dead-lettered.

A song whose audio fetch fails transiently (:attr:`ranker.errors.InputError.transient`: an
HTTP 5xx or 429, a timeout, a refused or reset connection) is not dead-lettered at once. The
worker publishes its original event (value and key) to ``kafka.topics.songs_retry`` with
headers that say how many tries were made, when the next may start (not before) and where
the event first came from, and commits the original as usual. The worker also consumes the
retry topic; a retry record that is not due yet pauses only its own retry-topic partition
(:class:`RetryPauses`) until its not-before time, so ``songs.generated`` and the other retry
partitions keep flowing. Not-before is a lower bound: a record waits behind an earlier one of
its partition. After ``worker.fetch_max_attempts`` tries the usual dead letter is written,
its reason saying how many tries were made, and ``apexrank dead-letters replay`` can send it
again once the cause is fixed.

Offsets are committed only for processed records (a paused partition's position is moved back
to its first waiting record), so a crash loses nothing: waiting records are read again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from prometheus_client import Counter, Gauge

from consumers.kafka_io import OutRecord
from consumers.loop import Message, dead_letter
from ranker.errors import InputError
from ranker.events import DeadLetter
from ranker.settings import Settings

log = logging.getLogger(__name__)

#: Header names on retry records: tries made so far, earliest next try (epoch ms), the first record.
ATTEMPTS = "apexrank-attempts"
NOT_BEFORE_MS = "apexrank-not-before-ms"
ORIGIN = "apexrank-origin"  # "topic/partition/offset" of the songs.generated record
LAST_ERROR = "apexrank-last-error"  # the error code of the last try, for whoever reads the topic

RETRIES_SCHEDULED = Counter(
    "apexrank_worker_fetch_retries_scheduled_total",
    "Songs whose audio fetch failed transiently, sent to the retry topic for another try",
    ["code"],
)
RETRIES_EXHAUSTED = Counter(
    "apexrank_worker_fetch_retries_exhausted_total",
    "Songs dead-lettered after worker.fetch_max_attempts transient fetch failures",
    ["code"],
)
RETRY_PARTITIONS_WAITING = Gauge(
    "apexrank_worker_retry_partitions_waiting",
    "Retry-topic partitions paused until their next record is due",
)


@dataclass(frozen=True)
class RetryState:
    """What a message's retry headers say (a ``songs.generated`` record has none: its first try)."""

    attempts: int  # tries made before this one
    not_before: float  # epoch seconds; 0 when due at once
    origin: tuple[str, int, int]  # topic, partition, offset of the first record

    @classmethod
    def of(cls, msg: Message) -> RetryState:
        """Parse the headers; missing or malformed ones read as a first try, due now (never a crash)."""
        headers = dict(msg.headers)
        origin = (msg.topic, msg.partition, msg.offset)
        try:
            attempts = max(0, int(headers.get(ATTEMPTS, b"0")))
        except ValueError:
            attempts = 0
        try:
            not_before = int(headers.get(NOT_BEFORE_MS, b"0")) / 1000
        except ValueError:
            not_before = 0.0
        raw_origin = headers.get(ORIGIN)
        if raw_origin is not None:
            topic, _, rest = raw_origin.decode("utf-8", "replace").rpartition("/")
            topic, _, partition = topic.rpartition("/")
            if topic and partition.isdigit() and rest.isdigit():
                origin = (topic, int(partition), int(rest))
        return cls(attempts, not_before, origin)


def origin_of(msg: Message) -> Message:
    """``msg`` under the coordinates of the record it first came as: what its dead letter names."""
    topic, partition, offset = RetryState.of(msg).origin
    return Message(topic, partition, offset, msg.key, msg.value)


@dataclass(frozen=True)
class Plan:
    """What to publish for a batch's transient failures."""

    retries: list[OutRecord] = field(default_factory=list)
    #: ``retries[i]``'s dead letter, sent instead if Kafka refuses the retry record itself.
    fallbacks: list[DeadLetter] = field(default_factory=list)
    exhausted: list[DeadLetter] = field(default_factory=list)


class RetryPolicy:
    """Turns a batch's transient failures into retry records or, after the last try, dead letters."""

    def __init__(self, settings: Settings) -> None:
        w = settings.worker
        self.topic = settings.kafka.topics.songs_retry
        self.max_attempts = w.fetch_max_attempts
        self.initial_s = w.fetch_backoff_initial_s
        self.max_s = w.fetch_backoff_max_s
        self.max_original_bytes = settings.kafka.dead_letter_original_bytes

    def backoff_s(self, attempts: int) -> float:
        """The wait after ``attempts`` failed tries: initial, doubling, capped."""
        return float(min(self.initial_s * 2.0 ** max(attempts - 1, 0), self.max_s))

    def wait_s(self, attempts: int, error: InputError) -> float:
        """The backoff, or longer when the source asked for it (Retry-After), never past ``fetch_backoff_max_s``."""
        wait = self.backoff_s(attempts)
        if error.retry_after_s is not None:
            wait = max(wait, min(error.retry_after_s, self.max_s))
        return wait

    def plan(self, failures: Sequence[tuple[Message, InputError]], now: float | None = None) -> Plan:
        now = time.time() if now is None else now
        plan = Plan()
        for msg, error in failures:
            attempts = RetryState.of(msg).attempts + 1
            origin = origin_of(msg)
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
            if attempts >= self.max_attempts:
                reason = f"{error.message} (transient; gave up after {tries}, worker.fetch_max_attempts)"
                plan.exhausted.append(dead_letter(origin, error.code, reason, self.max_original_bytes))
                RETRIES_EXHAUSTED.labels(error.code).inc()
                continue
            wait_s = self.wait_s(attempts, error)
            headers = [
                (ATTEMPTS, str(attempts).encode()),
                (NOT_BEFORE_MS, str(int((now + wait_s) * 1000)).encode()),
                (ORIGIN, f"{origin.topic}/{origin.partition}/{origin.offset}".encode()),
                (LAST_ERROR, str(error.code).encode()),
            ]
            plan.retries.append((self.topic, msg.key, msg.value or b"", headers))
            reason = f"{error.message} (transient; the retry record could not be published after {tries})"
            plan.fallbacks.append(dead_letter(origin, error.code, reason, self.max_original_bytes))
            RETRIES_SCHEDULED.labels(error.code).inc()
            log.info(
                "transient %s after %s; retrying in %.1fs: %s",
                error.code,
                tries,
                wait_s,
                error.message,
                extra={"song_id": (msg.key or b"").decode("utf-8", "replace"), "attempt": attempts},
            )
        return plan


class RetryPauses:
    """Holds back each retry-topic partition whose next record is not due, never anything else.

    :meth:`admit` lets through a poll's due records; at a partition's first record not yet due
    it seeks the consumer back to it and pauses that partition. :meth:`resume_due` resumes it
    once the time has come. The consumer's position for a paused partition is the waiting
    record, so a commit never skips it.
    """

    def __init__(self, topic: str, max_wait_s: float) -> None:
        self.topic = topic
        self.max_wait_s = max_wait_s
        self._until: dict[Any, float] = {}  # TopicPartition -> epoch seconds

    def due_at(self, msg: Message, now: float) -> float:
        """When ``msg`` may be tried: its not-before, but never further off than the longest backoff
        (a header from a skewed clock or a foreign producer must not park a partition for good)."""
        return min(RetryState.of(msg).not_before, now + self.max_wait_s)

    @property
    def waiting(self) -> bool:
        return bool(self._until)

    def admit(self, consumer: Any, messages: Sequence[Message], now: float | None = None) -> list[Message]:
        """The messages to process now, in the order given (``messages`` in partition, offset order)."""
        now = time.time() if now is None else now
        held: set[tuple[str, int]] = set()
        out: list[Message] = []
        for msg in messages:
            if msg.topic != self.topic:
                out.append(msg)
                continue
            if (msg.topic, msg.partition) in held:
                continue  # behind a record that waits
            due = self.due_at(msg, now)
            if due <= now:
                out.append(msg)
                continue
            tp = TopicPartition(msg.topic, msg.partition)
            consumer.seek(tp, msg.offset)
            consumer.pause(tp)
            self._until[tp] = due
            held.add((msg.topic, msg.partition))
            log.debug("retry partition %s/%d waits %.1fs at offset %d", tp.topic, tp.partition, due - now, msg.offset)
        RETRY_PARTITIONS_WAITING.set(len(self._until))
        return out

    def resume_due(self, consumer: Any, now: float | None = None) -> None:
        """Resume the partitions whose waiting record is due; forget those no longer ours (a rebalance)."""
        now = time.time() if now is None else now
        paused = set(consumer.paused())
        for tp, due in list(self._until.items()):
            if tp not in paused:  # reassigned: the new owner (maybe us) reads the record again
                del self._until[tp]
            elif due <= now:
                consumer.resume(tp)
                del self._until[tp]
        RETRY_PARTITIONS_WAITING.set(len(self._until))

    def poll_timeout_ms(self, default_ms: int, now: float | None = None) -> int:
        """A poll ends no later than the next waiting record is due."""
        if not self._until:
            return default_ms
        now = time.time() if now is None else now
        return max(1, min(default_ms, int((min(self._until.values()) - now) * 1000) + 1))
