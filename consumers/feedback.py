"""The feedback consumer: ``engagement`` -> deduplicated counters, the engagement log, feed updates;
``feeds.served`` -> the served log.

Per polled batch, in this order:

1. parse; invalid events go to ``engagement.dead-letter`` with a reason;
2. count the events in Redis, one Lua script call per 2,500 events (per song on
   Redis Cluster, see :class:`indexes.EngagementCounters`), each chunk while the next
   is parsed: each event's dedup key is set (NX, for the dedup window) to the id
   of the message carrying it (partition and offset), and only a new key
   increments the counter. An event already counted by another message is a
   duplicate and goes no further; one counted by this same message before a crash
   comes back as a replay: not counted again, but it goes through the steps below
   like a new one;
3. append the new and replayed events to the engagement log (exactly once: files
   are named by partition offset range, and offsets already logged are skipped,
   see :mod:`indexes.engagement_log`), on a thread, while
4. the affected songs' feed entries are recomputed (from the counters in Redis), and
   the new and replayed events update their listeners' taste and heard sets
   (:mod:`indexes.listeners`; ``listeners.*``), with the liked and skipped songs'
   vectors read from every shard's embedding store (:mod:`consumers.shard_embeddings`);
5. once all are done, flush dead letters, then commit offsets.

The batch's ``feeds.served`` records (what the API served, :class:`ranker.events.FeedServed`) are
parsed apart and appended to the served log (:mod:`indexes.served_log`, exactly once by offsets
like the engagement log) beside step 3; a bad one goes to ``engagement.dead-letter`` with its
reason. They never touch counters or listeners. Offsets are committed only after both logs are
written, so a crash replays the batch and the join of the two logs stays complete.

A crash between any two steps replays the batch from the last committed offset:
step 2 counts nothing twice and hands back exactly the events the crashed run had
counted, step 3 logs nothing twice, step 4 recomputes from the current counters.
So the batch converges to the same counters, log and feeds, provided it is
replayed within the dedup window. Engagement for a song that has not been scored
yet is counted all the same: its counters wait in the song's hash for its scores.
Engagement for a song taken down (a tombstone, see :mod:`consumers.takedown`) is a
no-op: not counted, not logged, no feed update; it is counted on
``apexrank_feedback_events_total{outcome="tombstoned"}``.

Listener state is a second step, not the counters' atomic step: the song's counters live in
the song's slot and the listener's keys in the user's (two slots on Redis Cluster, and the
counting script decides which events go on: tombstoned songs and duplicates do not). The
listener step therefore keeps its own dedup key per user and event id, so it is idempotent
on its own. A crash after step 2 and before step 4 leaves counters counted and tastes not yet
moved; nothing is committed, so the replay brings the events back as replays and step 4
applies them, once. What a crash cannot do: count a taste event twice, or lose one whose
batch is replayed within the dedup window. What it can do: for the moment between the crash
and the replay, the counters are ahead of the tastes. A song with no vector in any
embedding store (not scored yet, or on a shard this consumer cannot read) still counts and
marks the song heard, but moves no taste, now or later; it is counted on
``apexrank_feedback_taste_missing_vectors_total``.

Besides events by outcome, ``--metrics-port`` serves its dead letters by code and, read
after each batch as the worker does, its lag on the engagement topic (:func:`update_lag`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from kafka import TopicPartition
from prometheus_client import Counter

from consumers import metrics
from consumers.kafka_io import (
    Publisher,
    ensure_topics,
    log_size_limits,
    make_consumer,
    publish_outputs,
    topic_id,
)
from consumers.loop import (
    IdleClock,
    Message,
    RejoinCheck,
    Stopping,
    caught_up,
    commit,
    dead_letter,
    in_partition_order,
    retry_infra,
    update_lag,
)
from consumers.shard_embeddings import ShardEmbeddings
from indexes import DUPLICATE, REPLAY, TOMBSTONED, message_marker
from indexes.engagement_log import EngagementLog
from indexes.listeners import ListenerEvent, ListenerUpdate
from indexes.served_log import ServedLog
from ranker import stores
from ranker.errors import ConfigError, InputError
from ranker.events import DeadLetter, Engagement, FeedServed
from ranker.serving.arms import record_arm_events
from ranker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENTS = Counter("apexrank_feedback_events_total", "Engagement events by outcome", ["outcome"])

#: Event types that carry a taste weight (:func:`indexes.listeners.taste_weight`): their songs' vectors are read.
TASTE_TYPES = frozenset({"like", "unlike", "skip"})

#: Called with the song ids whose counters changed, to refresh their feed entries.
FeedUpdater = Callable[[Sequence[str]], None]


@dataclass
class FeedbackStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0  # counted by this batch, or by an earlier run of it (replayed)
    replayed: int = 0  # counted before a crash and finished now (log, feed)
    duplicates: int = 0
    tombstoned: int = 0  # events for songs taken down: not counted, not logged
    dead_letters: int = 0
    logged: int = 0
    messages_served: int = 0  # feeds.served messages polled (``messages`` counts the engagement topic's)
    served: int = 0  # feeds.served records written to the served log
    taste_updates: int = 0  # events applied to listener state that moved a taste
    missing_vectors: int = 0  # likes/skips applied with no vector for their song
    dead_by_code: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0  # wall time from the first message polled to the last commit
    #: Wall time per step (poll, parse, count, log+feed, commit), for profiling.
    step_s: dict[str, float] = field(default_factory=dict)

    def add_time(self, step: str, since: float) -> float:
        now = time.perf_counter()
        self.step_s[step] = self.step_s.get(step, 0.0) + now - since
        return now


class FeedbackConsumer:
    """The Kafka loop for engagement events; see the module docstring for the write order."""

    #: Events parsed per count call: the next chunk is parsed while Redis counts this one.
    count_chunk = 2500

    def __init__(self, settings: Settings, on_engagement: FeedUpdater | None = None) -> None:
        self.settings = settings
        self.stats = FeedbackStats()
        self._stop = threading.Event()
        self.counters = stores.engagement_counters(settings)
        self.listeners = stores.listener_store(settings)
        self.arms = stores.arm_store(settings)  # A/B arms' totals (docs/arms.md); the null store without arms
        self._embeddings: ShardEmbeddings | None = None  # opened when first needed (the worker may not have run)
        self.log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
        self.served_log = ServedLog(settings.served_log_dir, settings.kafka.topics.feeds_served)
        self.on_engagement = on_engagement if on_engagement is not None else _default_feed_updater(settings)
        self._log_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engagement-log")
        self._count_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engagement-count")

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def _restarted(self, consumer: Any, messages: Sequence[Message]) -> None:
        """Set log files aside as an earlier generation when a topic's offsets started again (a broker
        that came back empty, a topic made again); otherwise the logs would skip the new records up to
        the offsets they hold. Seen by the topic's id changing (brokers that give one), or by a
        partition's high watermark at or below the offset its log holds, which a replay never shows."""
        topics = self.settings.kafka.topics
        logs = {topics.engagement: self.log, topics.feeds_served: self.served_log}
        for topic in sorted({m.topic for m in messages} & set(logs)):
            if (tid := topic_id(consumer, topic)) is not None and (moved := logs[topic].follow_topic(tid)):
                log.warning(
                    "%s was created again (id %s): %d log files kept as an earlier generation", topic, tid, moved
                )
        for topic, partition in sorted({(m.topic, m.partition) for m in messages}):
            offset_log = logs.get(topic)
            high = consumer.highwater(TopicPartition(topic, partition))
            if offset_log is None or high is None or high > (logged := offset_log.logged_through(partition)):
                continue
            moved = offset_log.restart(partition)
            log.warning(
                "%s partition %d restarted its offsets (high watermark %d, logged through %d): %d log files "
                "kept as an earlier generation",
                topic,
                partition,
                high,
                logged,
                moved,
            )

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        f = self.settings.feedback
        return retry_infra(what, fn, stop=self._stop, initial_s=f.retry_initial_s, max_s=f.retry_max_s)

    def process(self, messages: Sequence[Message]) -> list[DeadLetter]:
        """Steps 1-4 for one batch (and its served records, to the served log); returns the dead letters
        to publish. Safe to repeat."""
        stats = self.stats
        t = time.perf_counter()
        dead: list[DeadLetter] = []
        served_topic = self.settings.kafka.topics.feeds_served
        if any(m.topic == served_topic for m in messages):
            served = [m for m in messages if m.topic == served_topic]
            messages = [m for m in messages if m.topic != served_topic]
            serving = self._log_thread.submit(self._log_served, served)
        else:
            serving = None
        kept: list[Message] = []
        events: list[Engagement] = []
        parse = Engagement.parse
        budget = self.settings.kafka.dead_letter_original_bytes
        now = datetime.now(UTC)
        updated_at = now.isoformat()
        fb = self.settings.feedback
        # Steps 1 and 2 overlap: each chunk parsed is counted on a thread (which mostly waits on
        # Redis running the script) while the next chunk is parsed. One thread, so chunks are
        # counted in order.
        counting: list[Future[str]] = []
        try:
            for lo in range(0, len(messages), self.count_chunk):
                first = len(events)
                for msg in messages[lo : lo + self.count_chunk]:
                    try:
                        event = parse(msg.value)  # type: ignore[arg-type]
                        event.check_ts(now, fb.ts_max_skew_s, fb.ts_min)
                    except InputError as exc:
                        dead.append(dead_letter(msg, exc.code, exc.message, budget))
                        continue
                    events.append(event)
                    kept.append(msg)
                chunk, msgs = events[first:], kept[first:]
                counting.append(
                    self._count_thread.submit(
                        self.counters.count,
                        [e.song_id for e in chunk],
                        [e.event_id for e in chunk],
                        [e.type for e in chunk],
                        [message_marker(m.partition, m.offset) for m in msgs],
                        updated_at,
                        [e.position for e in chunk],
                    )
                )
            t = stats.add_time("parse", t)
        finally:
            wait(counting)
        status = "".join(f.result() for f in counting)
        if DUPLICATE in status or TOMBSTONED in status:
            take = [i for i, st in enumerate(status) if st != DUPLICATE and st != TOMBSTONED]
            events = [events[i] for i in take]
            kept = [kept[i] for i in take]
        t = stats.add_time("count", t)

        columns: dict[str, list[Any]] = {
            "event_id": [e.event_id for e in events],
            "song_id": [e.song_id for e in events],
            "user_id": [e.user_id for e in events],
            "type": [e.type for e in events],
            "ts": [e.ts for e in events],
            "feed": [e.feed for e in events],
            "position": [e.position for e in events],
            "request_id": [e.request_id for e in events],
            "partition": [m.partition for m in kept],
            "offset": [m.offset for m in kept],
        }
        songs = sorted({e.song_id for e in events})
        # Steps 3 and 4 are independent: the Parquet write and its fsyncs (which release the GIL)
        # run on a thread, listener state on the (now idle) counting thread, while the feed update
        # waits on Redis. All end before this returns.
        pending = self._log_thread.submit(self.log.append_columns, columns)
        listening = self._count_thread.submit(self._update_listeners, events)
        arming = self._count_thread.submit(record_arm_events, self.arms, events, self.settings)
        try:
            if songs:
                self.on_engagement(songs)
        finally:
            logged = pending.result()
            update = listening.result()
            arming.result()
            if serving is not None:
                written, refused = serving.result()
                stats.served += written
                dead.extend(refused)
        stats.add_time("log+feed", t)
        stats.taste_updates += update.taste_updates
        stats.missing_vectors += update.missing_vectors

        replayed = status.count(REPLAY)
        tombstoned = status.count(TOMBSTONED)
        duplicates = len(status) - len(events) - tombstoned
        stats.logged += logged
        stats.accepted += len(events)
        stats.replayed += replayed
        stats.duplicates += duplicates
        stats.tombstoned += tombstoned
        EVENTS.labels("accepted").inc(len(events) - replayed)
        EVENTS.labels("replayed").inc(replayed)
        EVENTS.labels("duplicate").inc(duplicates)
        EVENTS.labels("tombstoned").inc(tombstoned)
        return dead

    def _log_served(self, messages: Sequence[Message]) -> tuple[int, list[DeadLetter]]:
        """The served records to the served log (how many were new), and the bad ones' dead letters."""
        budget = self.settings.kafka.dead_letter_original_bytes
        dead: list[DeadLetter] = []
        records: list[FeedServed] = []
        kept: list[Message] = []
        for msg in messages:
            try:
                records.append(FeedServed.parse(msg.value))  # type: ignore[arg-type]
            except InputError as exc:
                dead.append(dead_letter(msg, exc.code, exc.message, budget))
                continue
            kept.append(msg)
        columns: dict[str, list[Any]] = {
            name: [getattr(r, name) for r in records]
            for name in (
                "request_id",
                "served_at",
                "kind",
                "feed",
                "user_id",
                "arm",
                "model_version",
                "song_ids",
                "explored",
                "propensity",
                "pool",
            )
        }
        columns["partition"] = [m.partition for m in kept]
        columns["offset"] = [m.offset for m in kept]
        return self.served_log.append_columns(columns), dead

    def _update_listeners(self, events: Sequence[Engagement]) -> ListenerUpdate:
        """Step 4's listener half: taste and heard sets, with the vectors of the songs that carry a weight."""
        if not events or not self.listeners.keeps_state:
            return ListenerUpdate()
        weighted = sorted({e.song_id for e in events if e.type in TASTE_TYPES})
        vectors = self._vectors(weighted) if weighted else {}
        update = self.listeners.record(
            [ListenerEvent(e.event_id, e.user_id, e.song_id, e.type, e.ts.timestamp()) for e in events], vectors
        )
        metrics.TASTE_EVENTS.labels("taste").inc(update.taste_updates)
        metrics.TASTE_EVENTS.labels("heard").inc(update.applied - update.taste_updates)
        metrics.TASTE_EVENTS.labels("seen").inc(update.seen)
        metrics.TASTE_MISSING_VECTORS.inc(update.missing_vectors)
        return update

    def _vectors(self, song_ids: Sequence[str]) -> dict[str, Any]:
        """The songs' index vectors from every shard's store; none while no worker has written a store."""
        if self._embeddings is None:
            try:
                self._embeddings = ShardEmbeddings(self.settings)
            except ConfigError:
                return {}  # looked for again next batch
        return self._embeddings.index_vectors(song_ids)

    def run(self, until_idle_s: float | None = None, *, until_caught_up: bool = False) -> FeedbackStats:
        """Consume until stopped, ``until_idle_s`` with nothing to read, or (``until_caught_up``) until every
        assigned partition is read to its end."""
        s = self.settings
        topics = s.kafka.topics
        subscribed = [topics.engagement, topics.feeds_served]
        if s.kafka.auto_create_topics:
            self._retry(
                "create topics",
                lambda: ensure_topics(s.kafka, [*subscribed, topics.engagement_dead_letter]),
            )
        self._retry("read size limits", lambda: log_size_limits(s.kafka, [topics.engagement_dead_letter]))
        # After every rebalance: recreate missing topics (an emptied broker), re-read lost commits.
        rejoins = RejoinCheck(
            (lambda: ensure_topics(s.kafka, [*subscribed, topics.engagement_dead_letter]))
            if s.kafka.auto_create_topics
            else None,
            s.kafka.request_timeout_ms,
        )
        consumer = self._retry(
            "connect consumer",
            lambda: make_consumer(s.kafka, s.kafka.feedback_group_id, subscribed, s.feedback.max_poll_records, rejoins),
        )
        producer = Publisher(s.kafka)
        assigned: frozenset[Any] = frozenset()
        idle = IdleClock(until_idle_s, functools.partial(caught_up, consumer) if until_caught_up else None)
        first_message: float | None = None
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                polled = consumer.poll(timeout_ms=s.feedback.poll_timeout_ms, max_records=s.feedback.max_poll_records)
                now_assigned = frozenset(consumer.assignment())
                if now_assigned != assigned:  # partitions moved: other members may have logged them
                    assigned = now_assigned
                    self.log.refresh()
                    self.served_log.refresh()
                # kafka-python's ConsumerRecords carry the fields of a Message: used as they are.
                try:  # after a rebalance: recreate the topics, re-read partitions whose commits the broker lost
                    messages: list[Message] = self._retry(
                        "check offsets after a rebalance",
                        functools.partial(rejoins.reconcile, consumer, in_partition_order(polled)),
                    )
                except Stopping:
                    break
                if not messages:
                    if idle.expired(bool(assigned)):
                        break
                    continue
                last_message = idle.busy()
                rejoins.consumed(messages)
                first_message = first_message or last_message
                self.stats.add_time("poll", t)
                try:
                    self._retry("check for restarted offsets", functools.partial(self._restarted, consumer, messages))
                    dead = self._retry("process", functools.partial(self.process, messages))

                    t = time.perf_counter()
                    dropped = self._retry(
                        "publish dead letters",
                        functools.partial(publish_outputs, producer, [], dead, topics.engagement_dead_letter),
                    )
                    metrics.RECORDS_DROPPED.inc(dropped)
                    self._retry("commit offsets", lambda: commit(consumer))
                    self.log.maybe_prune(s.retention.engagement_log_days)  # at most hourly
                    self.served_log.maybe_prune(s.retention.engagement_log_days)
                    self.stats.add_time("commit", t)
                except Stopping:
                    log.warning("stopping with a batch uncommitted; it will be redelivered")
                    break
                update_lag(consumer)  # apexrank_consumer_lag_messages{topic=engagement}, as the worker's
                self.stats.batches += 1
                self.stats.busy_s = time.monotonic() - first_message
                served = sum(1 for m in messages if m.topic == topics.feeds_served)
                self.stats.messages += len(messages) - served
                self.stats.messages_served += served
                self.stats.dead_letters += len(dead)
                for d in dead:
                    self.stats.dead_by_code[d.error_code] = self.stats.dead_by_code.get(d.error_code, 0) + 1
                    metrics.FEEDBACK_DEAD_LETTERS.labels(d.error_code).inc()
                EVENTS.labels("dead_letter").inc(len(dead))
        finally:
            producer.close()
            consumer.close(autocommit=False)
            self.counters.close()
            self._log_thread.shutdown(wait=True)
            self._count_thread.shutdown(wait=True)
            self.listeners.close()
            self.arms.close()
            if self._embeddings is not None:
                self._embeddings.close()
        return self.stats


def _default_feed_updater(settings: Settings) -> FeedUpdater:
    """The ranker's incremental feed update (imported when a consumer is built, not with this module)."""
    from ranker.serving.writer import make_engagement_updater

    return make_engagement_updater(settings)
