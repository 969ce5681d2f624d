"""The scoring worker: the Kafka loop around :class:`~consumers.pipeline.ScoringPipeline`.

Delivery is at-least-once with idempotent writes. For each polled batch the worker
hands the messages to the pipeline (parse, fetch, decode, encode, score), lets it
write (embedding store, FAISS index, Redis), publishes ``songs.scored`` and the dead
letters (flushed), and only then commits the offsets. A crash at any point replays the
batch; every write is an upsert keyed by song_id, so a replay creates no second feed
entry and no second vector. Infrastructure failures (Redis, Kafka, disk) are retried
with backoff and nothing is committed until the batch's writes have landed. A device that
failed for good (a sticky CUDA error: :func:`~ranker.scoring.is_device_fault`) stops the
worker with the songs in hand uncommitted and not dead-lettered: it exits non-zero, and the
restart, with a fresh device context, reads them again. A song whose
audio fetch failed transiently goes to the retry topic, which the worker also consumes,
and is tried again after a backoff (:mod:`consumers.retries`). Between batches the worker
switches to a newly promoted head. After every rebalance it recreates missing topics and
re-reads any partition whose commits the broker lost (:class:`~consumers.loop.RejoinCheck`):
a memory-mode broker that restarted comes back empty while the worker runs on. Between
batches it also applies takedowns (``songs.deleted``, read in a group of this shard's own:
:mod:`consumers.takedown_follower`) and sweeps its shard of songs past the retention window
(:mod:`consumers.retention`); an event of a song taken down or expired is a no-op.

With ``worker.pipelined`` (the default) the batches overlap: a pool decodes while the
encoder scores groups of songs already decoded (:mod:`consumers.worker_stages`). Groups
finish out of poll order; each partition is committed only up to its lowest offset not yet
written, dead-lettered or sent to the retry topic, so a crash still only replays.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from consumers import metrics
from consumers.kafka_io import (
    OutRecord,
    Publisher,
    all_topics,
    ensure_topics,
    log_size_limits,
    make_consumer,
    publish_outputs,
)
from consumers.loop import (
    IdleClock,
    Message,
    RejoinCheck,
    Stopping,
    caught_up,
    commit,
    in_partition_order,
    message_of,
    retry_infra,
    stop_on_signals,
    update_lag,
)
from consumers.pipeline import BatchResult, ScoringPipeline
from consumers.retention import RetentionSweeper
from consumers.retries import RetryPauses, RetryPolicy
from consumers.takedown import apply_deleted, parse_deleted
from consumers.takedown_follower import TakedownFollower
from consumers.worker_stages import CommitTracker, StagedScoring, commit_offsets
from ranker import stores
from ranker.audio import check_file_policy
from ranker.encoders import build_encoder
from ranker.errors import ConfigError
from ranker.model.registry import resolve_model_dir
from ranker.scoring import is_device_fault, load_current_model
from ranker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkerStats:
    batches: int = 0
    messages: int = 0
    scored: int = 0
    dead_letters: int = 0
    reused_embeddings: int = 0
    retries_scheduled: int = 0  # transient fetch failures sent to the retry topic
    retries_exhausted: int = 0  # ... dead-lettered after the last try (counted in dead_letters too)
    tombstoned: int = 0  # songs.generated events of songs taken down: skipped
    expired: int = 0  # ... of songs past the retention window: skipped
    takedowns: int = 0  # embeddings removed from this shard by songs.deleted
    dead_by_code: dict[str, int] = field(default_factory=dict)


@dataclass
class _Loop:
    """What one run of the worker's loop holds."""

    consumer: Any
    producer: Publisher
    takedowns: TakedownFollower
    rejoins: RejoinCheck
    idle: IdleClock


def _model_dir(settings: Settings) -> Path | None:
    try:
        return resolve_model_dir(settings.head_dir)
    except ConfigError:
        return None


def _retries_first(messages: list[Message], retry_topic: str) -> list[Message]:
    """Retries before new events: when a batch holds both for one song, the newer event wins."""
    return sorted(messages, key=lambda m: m.topic != retry_topic)


def _offset_ranges(messages: Sequence[Message]) -> dict[str, list[int]]:
    """``{"topic/partition": [first, last]}`` for structured logs."""
    out: dict[str, list[int]] = {}
    for m in messages:
        key = f"{m.topic}/{m.partition}"
        lo, hi = out.get(key, [m.offset, m.offset])
        out[key] = [min(lo, m.offset), max(hi, m.offset)]
    return out


class Worker:
    """The Kafka loop around :class:`ScoringPipeline`: poll, process, write, produce, commit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self.assignment: frozenset[Any] = frozenset()  # partitions owned after the last poll
        self._stop = threading.Event()
        # Refuse what cannot be run safely before loading anything: file:// with no root outside development.
        check_file_policy(settings.audio, settings.dev_mode)
        # Build the encoder first: missing weights must stop the worker before it joins a group.
        self.encoder = build_encoder(settings)
        self.model = load_current_model(settings, self.encoder.spec)
        if not self.model.trained and not settings.model.allow_untrained:
            raise ConfigError(
                f"no trained APEX head at {settings.head_dir}: the worker would score every song with the "
                f"untrained head {self.model.version}. Train and promote one (apexrank train --features DIR "
                "--catalog C --out MODEL_DIR --promote), import the released one (apexrank import-released "
                "--checkpoint P --out MODEL_DIR --promote), or set APEXRANK_MODEL__ALLOW_UNTRAINED=true "
                "to score with it anyway (tests, plumbing benchmarks)"
            )
        self._model_dir = _model_dir(settings)
        self._next_model_check = time.monotonic() + settings.worker.model_check_s
        self.index = stores.embedding_index(settings, self.encoder.vector_dim)
        self.store = stores.score_store(settings)
        self.pipeline = ScoringPipeline(settings, self.encoder, self.model, self.index, self.store)
        self.retention = RetentionSweeper(settings, self.index, self.store)
        self.retries = RetryPolicy(settings)
        # The retry partitions waiting for their next record to be due.
        self.retry_pauses = RetryPauses(settings.kafka.topics.songs_retry, settings.worker.fetch_backoff_max_s)
        self._export_model()
        log.info(
            "worker ready: encoder=%s model=%s index=%d vectors",
            self.encoder.encoder_id,
            self.model.version,
            len(self.index),
        )

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def maybe_reload_model(self, force: bool = False) -> bool:
        """Switch to a newly promoted head between batches (``models/current`` moved)."""
        now = time.monotonic()
        if not force and now < self._next_model_check:
            return False
        self._next_model_check = now + self.settings.worker.model_check_s
        directory = _model_dir(self.settings)
        if directory is None or directory == self._model_dir:
            return False
        try:
            model = load_current_model(self.settings, self.encoder.spec)
        except ConfigError as exc:
            log.error("not switching to %s: %s", directory, exc)
            return False
        log.info("switching model %s -> %s", self.model.version, model.version)
        self.model = self.pipeline.model = model
        self._model_dir = directory
        self._export_model()
        return True

    def _export_model(self) -> None:
        """The model in use on /metrics: its version, the encoder, and whether the head was trained."""
        trained = "true" if self.model.trained else "false"
        metrics.MODEL_INFO.info(
            {"model_version": self.model.version, "encoder": self.encoder.encoder_id, "trained": trained}
        )
        metrics.observe_model_quantiles(self.model.card.training if self.model.trained else None)

    def install_signal_handlers(self) -> None:
        stop_on_signals(self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        self._stop.set()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        w = self.settings.worker
        return retry_infra(what, fn, stop=self._stop, initial_s=w.retry_initial_s, max_s=w.retry_max_s)

    def run(self, until_idle_s: float | None = None, *, until_caught_up: bool = False) -> WorkerStats:
        """Consume until stopped (or until ``until_idle_s`` seconds pass with no message and no retry waiting;
        ``until_caught_up``: or until every partition is read to its end, nothing in hand and no retry waiting)."""
        s = self.settings
        topics = s.kafka.topics
        if s.kafka.auto_create_topics:
            self._retry("create topics", lambda: ensure_topics(s.kafka, all_topics(s.kafka)))
        self._retry(
            "read size limits",
            lambda: log_size_limits(s.kafka, [topics.songs_scored, topics.dead_letter, topics.songs_retry]),
        )
        rejoins = RejoinCheck(self._recreate_topics, s.kafka.request_timeout_ms)
        # The retry topic is read by the same consumer: a waiting retry pauses only its own partition.
        consumer = self._retry(
            "connect consumer",
            lambda: make_consumer(
                s.kafka,
                s.kafka.worker_group_id,
                [topics.songs_generated, topics.songs_retry],
                s.worker.max_poll_records,
                rejoins,
            ),
        )
        # Takedowns: every shard must see every songs.deleted, so each reads it in a group of its own.
        takedowns = TakedownFollower(
            lambda rejoins: self._retry(
                "connect takedown consumer",
                lambda: make_consumer(
                    s.kafka, self._takedown_group(), [topics.songs_deleted], s.worker.max_poll_records, rejoins
                ),
            ),
            s.kafka.request_timeout_ms,
        )
        takedowns.start()
        producer = Publisher(s.kafka)
        idle = IdleClock(until_idle_s, functools.partial(caught_up, consumer) if until_caught_up else None)
        loop = _Loop(consumer, producer, takedowns, rejoins, idle)
        try:
            if s.worker.pipelined:
                self._run_pipelined(loop)
            else:
                self._run_batches(loop)
        except Exception as exc:
            if is_device_fault(exc):
                # Retried by the restart: the orchestrator's new process gets a fresh device context.
                metrics.RETRIES.labels("device fault").inc()
                log.critical(
                    "the device failed (%s: %s); exiting with the songs in hand uncommitted: "
                    "they are read again after the restart",
                    type(exc).__name__,
                    exc,
                )
            raise
        finally:
            takedowns.close()
            self.close(consumer, producer)
        return self.stats

    def _poll(self, loop: _Loop, max_records: int, timeout_ms: int) -> list[Message]:
        """Between polls: takedowns, retention, due retries, a new head; then one poll, reconciled
        after a rebalance, retries first. Raises :class:`Stopping` when asked to stop mid-retry."""
        s = self.settings
        self._take_down(loop.takedowns, loop.producer)
        self._retry("retention sweep", self.retention.maybe_sweep)
        consumer, pauses = loop.consumer, self.retry_pauses
        pauses.resume_due(consumer)
        polled = consumer.poll(timeout_ms=pauses.poll_timeout_ms(timeout_ms), max_records=max_records)
        fetched = [message_of(r) for r in in_partition_order(polled)]
        fetched = self._retry(
            "check offsets after a rebalance", functools.partial(loop.rejoins.reconcile, consumer, fetched)
        )
        self.assignment = frozenset(consumer.assignment())
        self.maybe_reload_model()
        messages = _retries_first(pauses.admit(consumer, fetched), s.kafka.topics.songs_retry)
        if messages:
            loop.idle.busy()
            loop.rejoins.consumed(messages)
            self._received(messages)
        return messages

    def _idle(self, loop: _Loop) -> bool:
        """Nothing polled and nothing in hand: True when the loop has been idle for ``until_idle_s``."""
        self.index.maybe_snapshot()
        if self.retry_pauses.waiting:  # retries are due later: not idle
            loop.idle.busy()
            return False
        if loop.idle.expired(bool(self.assignment)):
            log.info("idle (caught up, or for %ss); exiting", loop.idle.until_idle_s)
            return True
        return False

    def _received(self, messages: list[Message]) -> None:
        """Messages handed on for processing (the benchmark times from the first)."""
        metrics.EVENTS_IN.inc(len(messages))
        metrics.BATCH_SIZE.observe(len(messages))

    def _run_batches(self, loop: _Loop) -> None:
        """One polled batch at a time: process, write, publish, commit the consumer's positions."""
        w = self.settings.worker
        while not self._stop.is_set():
            try:
                messages = self._poll(loop, w.max_poll_records, w.poll_timeout_ms)
            except Stopping:
                break
            if not messages:
                if self._idle(loop):
                    break
                continue
            try:
                self._handle(messages, loop.producer)
            except Stopping:
                log.warning("stopping with a batch uncommitted; it will be redelivered")
                break
            try:
                self._retry("commit offsets", lambda: commit(loop.consumer))
            except Stopping:
                break
            metrics.COMMITS.inc()
            update_lag(loop.consumer)

    def _run_pipelined(self, loop: _Loop) -> None:
        """Decode in a pool while the encoder works on groups of songs already decoded
        (:mod:`consumers.worker_stages`); commit each partition up to its lowest offset in flight.

        A stop request (a signal) ends polling; the songs already polled go on through the stages
        for up to ``worker.stop_drain_s``, so that their partitions commit (groups finish out of poll
        order: stopping after the group in hand could leave all of them behind one song still decoding).
        What is left then stays uncommitted, to be read again. After a rebalance the commits
        lag what was read by the songs in flight, so :class:`RejoinCheck` reads those partitions
        again from the commit: the repeats supersede the songs in flight (no write is lost or doubled).
        """
        w = self.settings.worker
        stages = StagedScoring(self.pipeline, retry=self._retry)
        drain_until: float | None = None
        try:
            while True:
                if self._stop.is_set() and drain_until is None:
                    drain_until = time.monotonic() + w.stop_drain_s
                    if stages.busy:
                        log.info("stopping: finishing the %d messages in flight", stages.tracker.in_flight())
                if drain_until is not None and (not stages.busy or time.monotonic() >= drain_until):
                    break
                room = 0 if drain_until is not None else stages.room()
                messages: list[Message] = []
                if room:
                    messages = self._poll(loop, min(room, w.max_poll_records), 0 if stages.busy else w.poll_timeout_ms)
                    stages.tracker.forget((tp.topic, tp.partition) for tp in self.assignment)
                    stages.admit(messages)
                if not messages and not stages.busy:
                    if self._idle(loop):
                        break
                    continue
                # Room left and songs arriving: poll again first; otherwise wait for a group.
                wait_s = 0.0 if messages else stages.deadline_s
                group = stages.next_group(wait_s)
                if group is None:
                    continue
                t0 = time.perf_counter()
                write = self.pipeline.finish(group.songs, group.result, self._retry)
                stages.release(group)  # the encoder dropped the waveforms
                self._finish(group.messages, group.result, write, loop.producer, t0)
                stages.tracker.done(group.messages)
                self._commit_done(loop.consumer, stages.tracker)
        except Stopping:
            pass
        finally:
            if stages.busy:
                log.warning(
                    "stopping with %d messages uncommitted; they will be redelivered", stages.tracker.in_flight()
                )
            stages.close()

    def _commit_done(self, consumer: Any, tracker: CommitTracker) -> None:
        """Commit each assigned partition up to its lowest offset still in flight, where that moved."""
        offsets = tracker.due()
        if offsets:
            self._retry("commit offsets", lambda: commit_offsets(consumer, offsets))
            tracker.committed(offsets)
            metrics.COMMITS.inc()
            update_lag(consumer)

    def _takedown_group(self) -> str:
        """This shard's own group for songs.deleted (the store's uid is persistent and unique per shard;
        a recreated store replays every takedown, which removes nothing twice)."""
        return f"{self.settings.kafka.worker_group_id}.deleted.{self.index.store.store_uid():x}"

    def _take_down(self, follower: TakedownFollower, producer: Publisher) -> None:
        """Apply the songs.deleted events read so far: the songs' embeddings leave this shard's store
        and index; an event that does not parse is a dead letter. The follower commits once applied."""
        messages = follower.take()
        if not messages:
            return
        topics = self.settings.kafka.topics
        events, bad = parse_deleted(messages, self.settings.kafka.dead_letter_original_bytes)
        self.stats.takedowns += self._retry("apply takedowns", lambda: apply_deleted(self.index, events))
        self._retry("publish", lambda: publish_outputs(producer, [], bad, topics.dead_letter))
        follower.applied()

    def _recreate_topics(self) -> None:
        """After a rebalance: an emptied broker has lost the topics; create them as configured."""
        kafka = self.settings.kafka
        if kafka.auto_create_topics:
            created = ensure_topics(kafka, all_topics(kafka))
            if created:
                log.warning("recreated missing topics (an emptied broker?): %s", ", ".join(created))

    def _handle(self, messages: list[Message], producer: Publisher) -> None:
        t0 = time.perf_counter()
        # Processing only reads shared state (the embedding store, Redis), so it is safe to retry.
        result, write = self._retry("process", lambda: self.pipeline.process(messages))
        self._finish(messages, result, write, producer, t0)

    def _finish(
        self, messages: list[Message], result: BatchResult, write: Callable[[], None], producer: Publisher, t0: float
    ) -> None:
        """Write, then publish scores, retries and dead letters (flushed): ``messages`` are then done."""
        self._retry("write stores", write)
        topics = self.settings.kafka.topics
        plan = self.retries.plan(result.transient)
        dead = result.dead + plan.exhausted

        records: list[OutRecord] = [(topics.songs_scored, s.song_id.encode(), s.to_bytes()) for s in result.scored]
        fallbacks = {len(records) + i: letter for i, letter in enumerate(plan.fallbacks)}
        records += plan.retries
        dropped = self._retry(
            "publish", lambda: publish_outputs(producer, records, dead, topics.dead_letter, fallbacks)
        )
        metrics.RECORDS_DROPPED.inc(dropped)
        st = self.stats
        st.batches += 1
        st.messages += len(messages)
        st.scored += len(result.scored)
        st.reused_embeddings += result.reused
        st.dead_letters += len(dead)
        st.retries_scheduled += len(plan.retries)
        st.retries_exhausted += len(plan.exhausted)
        st.tombstoned += result.tombstoned
        st.expired += result.expired
        metrics.SONGS_SCORED.inc(len(result.scored))
        for d in dead:
            st.dead_by_code[d.error_code] = st.dead_by_code.get(d.error_code, 0) + 1
            metrics.DEAD_LETTERS.labels(d.error_code).inc()
            log.info(
                "dead letter %s at %s/%d@%d: %s",
                d.error_code,
                d.source_topic,
                d.partition,
                d.offset,
                d.message,
                extra={
                    "song_id": d.key,
                    "topic": d.source_topic,
                    "partition": d.partition,
                    "offset": d.offset,
                    "error_code": d.error_code,
                },
            )
        elapsed = time.perf_counter() - t0
        log.info(
            "batch: %d messages, %d scored, %d dead letters, %d retries in %.3fs",
            len(messages),
            len(result.scored),
            len(dead),
            len(plan.retries),
            elapsed,
            extra={
                "offsets": _offset_ranges(messages),
                "song_ids": [s.song_id for s in result.scored][:50],
            },
        )
        metrics.INDEX_SIZE.set(len(self.index))
        metrics.STAGE_SECONDS.labels("batch").observe(elapsed)
        metrics.observe_device_memory()

    def close(self, consumer: Any = None, producer: Publisher | None = None) -> None:
        self.pipeline.close()
        try:
            self.index.close()
        except OSError:
            log.exception("final index snapshot failed; the next start rebuilds from the embedding store")
        if producer is not None:
            producer.close()
        if consumer is not None:
            consumer.close(autocommit=False)
        self.store.close()
