"""What the two stream consumers (the scoring worker, the feedback consumer) share.

Both run the same loop: poll a batch, process it, write, publish dead letters, commit,
and stop between batches when asked (a signal, ``request_stop``), after ``until_idle_s``
with nothing to read, or once caught up with what was published before (``until_caught_up``).
This module holds the pieces of that loop that do not depend on what a batch means: the
message shape, dead letters, retries of infrastructure failures, commits, consumer lag, the
partition order of a poll, the idle clock, and the check after a rebalance that the broker
still holds the group's commits (:class:`RejoinCheck`).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.exceptions
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from consumers import metrics
from ranker.errors import ErrorCode
from ranker.events import DEFAULT_DEAD_LETTER_ORIGINAL_BYTES, DeadLetter

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors that mean "a dependency is down", never "this input is bad": retried, not dead-lettered.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.RedisClusterUnreachableError,  # no cluster node answers (not a ConnectionError)
    redis.exceptions.ClusterDownError,  # CLUSTERDOWN: slots unserved during a failover
    KafkaError,
    sqlite3.OperationalError,
    OSError,
)


class Stopping(Exception):
    """Raised inside a retry loop when shutdown was requested: leave the batch uncommitted."""


@dataclass
class Message:
    """The parts of a Kafka record the consumers need (decoupled from the client library)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()  # the retry topic's bookkeeping (consumers.retries)


def message_of(record: Any) -> Message:
    """A polled kafka-python record as a :class:`Message`."""
    headers = tuple((str(k), bytes(v or b"")) for k, v in (getattr(record, "headers", None) or ()))
    return Message(record.topic, record.partition, record.offset, record.key, record.value, headers)


def dead_letter(
    msg: Message,
    code: ErrorCode | str,
    message: str,
    max_original_bytes: int = DEFAULT_DEAD_LETTER_ORIGINAL_BYTES,
) -> DeadLetter:
    """The dead letter for ``msg`` (the worker's and the feedback consumer's), its original bounded."""
    return DeadLetter.build(
        msg.value,
        key=msg.key,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        code=code,
        message=message,
        max_original_bytes=max_original_bytes,
    )


def in_partition_order(polled: Mapping[Any, Sequence[T]]) -> list[T]:
    """The records of one ``poll()`` in (topic, partition) order, each partition's in offset order."""
    return [r for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for r in polled[tp]]


class IdleClock:
    """``until_idle_s`` of a consumer loop: idleness counts only once partitions are assigned.

    ``caught_up``: also done on the first empty poll at which it says the consumer has read everything
    (:func:`caught_up`): a run over what was published before it, without waiting out ``until_idle_s``.
    """

    def __init__(self, until_idle_s: float | None, caught_up: Callable[[], bool] | None = None) -> None:
        self.until_idle_s = until_idle_s
        self.caught_up = caught_up
        self.last_message = time.monotonic()
        self.assigned = False

    def busy(self) -> float:
        """A batch arrived: restart the clock; returns the time it was restarted at."""
        self.last_message = time.monotonic()
        return self.last_message

    def expired(self, assigned: bool) -> bool:
        """An empty poll: has the loop been idle for ``until_idle_s``? Still joining the group is not idle,
        and the clock starts at the first poll that finds partitions assigned: the poll that joined may
        have taken longer than ``until_idle_s`` by itself, with no fetch answered yet."""
        if not assigned or not self.assigned:
            self.assigned = assigned
            self.busy()
            return False
        if self.caught_up is not None and self.caught_up():
            return True
        return self.until_idle_s is not None and time.monotonic() - self.last_message >= self.until_idle_s


#: How long :func:`caught_up` waits for the broker's end offsets: not the client's request timeout, so
#: a broker that is down delays the loop by this much per empty poll, not by 30 s.
CAUGHT_UP_TIMEOUT_MS = 2_000


def caught_up(consumer: Any) -> bool:
    """Every partition assigned to ``consumer`` read to its end: what was published to them before this
    call has been consumed (one ListOffsets round trip). False with nothing assigned, while a
    partition has had no fetch answered, or when the broker does not answer (the loop goes on, and
    its own retries deal with the broker; a check must not end the run).

    The end is the larger of two readings. ListOffsets (``end_offsets``) is fresh, so it counts what
    this process produced since its last fetch (a worker's own retry records); but the embedded Tansu
    broker answers it with the last batch's base offset + 1, short of a batch of several records. The
    high watermark of the last fetch response is right on every broker, but as old as that fetch."""
    parts = list(consumer.assignment())
    if not parts:
        return False
    try:
        ends = consumer.end_offsets(parts, timeout_ms=CAUGHT_UP_TIMEOUT_MS)
    except KafkaError as exc:
        log.warning("could not read the end offsets (%s: %s); not caught up", type(exc).__name__, exc)
        return False
    for tp in parts:
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < max(high, ends.get(tp, 0)):
            return False
    return True


def stop_on_signals(handler: Callable[[int, Any], Any]) -> None:
    """Call ``handler`` on SIGTERM and SIGINT (the loop then finishes the batch in hand and exits)."""
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def retry_infra(what: str, fn: Callable[[], T], *, stop: threading.Event, initial_s: float, max_s: float) -> T:
    """Retry infrastructure failures with exponential backoff until they pass or ``stop`` is set.

    The first wait is ``initial_s``, doubling up to ``max_s``. Raises :class:`Stopping` when
    shutdown is requested mid-retry, so the caller leaves the batch uncommitted (it will be
    redelivered) instead of committing what was not written.
    """
    delay = initial_s
    while True:
        try:
            return fn()
        except INFRA_ERRORS as exc:
            metrics.RETRIES.labels(what).inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            if stop.wait(delay):
                raise Stopping(what) from exc
            delay = min(delay * 2, max_s)


def commit(consumer: Any) -> None:
    """Commit the consumed positions; a commit refused after a rebalance is not retried.

    The partitions now belong to another member, which resumes from the last commit and
    replays the batch: harmless, since every write is idempotent.
    """
    try:
        consumer.commit()
    except CommitFailedError as exc:
        log.warning("commit refused after a rebalance (%s); the batch will be replayed by the new owner", exc)


def update_lag(consumer: Any) -> None:
    """Consumer lag per partition from the high watermark the broker reports in fetch responses."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=100)
        except Exception:  # the position is unknown until the first fetch
            continue
        if position is not None:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


class Positioned(Protocol):
    """A polled record's place in its log (a :class:`Message`, or kafka-python's record as it is)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


P = TypeVar("P", bound=Positioned)


class RejoinCheck(ConsumerRebalanceListener):
    """After a rebalance, stop trusting fetch positions the broker cannot vouch for.

    kafka-python keeps its in-memory position for a partition that stays assigned through a
    rebalance. If the broker lost the group's commits meanwhile (a memory-mode broker that
    restarted comes back with empty topics and no groups), that position points past records
    the new log holds: new songs at offsets 0 and 1 behind a kept position 2 would never be
    read. So after each rebalance, :meth:`reconcile` compares the broker's committed offset of
    every assigned partition with how far this consumer has read it (:meth:`consumed`): where
    the commit is missing or behind, it seeks back to the commit (or the log's beginning) and
    drops what the poll returned for that partition. Those records were never committed, so
    nothing is lost, and every write downstream is an idempotent upsert. ``on_rejoin`` runs
    first (the worker recreates missing topics there, with the configured partition count).

    kafka-python calls the listener methods inside its network loop, so they only count the
    event; the broker is asked later, from the consumer's own thread.
    """

    def __init__(self, on_rejoin: Callable[[], object] | None = None, timeout_ms: int = 30_000) -> None:
        self.on_rejoin = on_rejoin
        self.timeout_ms = timeout_ms
        self._events = 0  # rebalance callbacks so far (written by the network loop)
        self._checked = 0  # ... of which reconcile() has handled
        self._read: dict[Any, int] = {}  # TopicPartition -> next offset after what this consumer read

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._events += 1

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._events += 1

    def consumed(self, records: Sequence[Positioned]) -> None:
        """Note how far the records handed on for processing go (call before committing them)."""
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self._read[tp] = max(self._read.get(tp, 0), r.offset + 1)

    def reconcile(self, consumer: Any, records: list[P]) -> list[P]:
        """Call right after each poll: after a rebalance, re-seek partitions whose commits the
        broker lost and return ``records`` without theirs; otherwise ``records`` as they are.

        Raises infrastructure errors before changing anything (retry it whole with ``retry_infra``).
        """
        seen = self._events
        if seen == self._checked:
            return records
        if self.on_rejoin is not None:
            self.on_rejoin()
        assigned = sorted(consumer.assignment(), key=lambda t: (t.topic, t.partition))
        committed = {tp: consumer.committed(tp, timeout_ms=self.timeout_ms) for tp in assigned}
        lost: set[tuple[str, int]] = set()
        for tp, offset in committed.items():
            read = self._read.get(tp)
            if read is None or (offset is not None and offset >= read):
                continue
            lost.add((tp.topic, tp.partition))
            log.warning(
                "%s/%d: the group's committed offset (%s) is behind what this consumer read (%d): an emptied "
                "broker lost the commits, or one was refused in a rebalance; reading again from %s",
                tp.topic,
                tp.partition,
                offset,
                read,
                offset if offset is not None else "the beginning",
            )
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        self._read = {tp: offset for tp, offset in committed.items() if offset is not None}
        self._checked = seen
        return [r for r in records if (r.topic, r.partition) not in lost]
