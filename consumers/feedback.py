"""The feedback consumer: ``engagement`` -> deduplicated counters, the engagement log, feed updates.

Per polled batch, in this order:

1. parse; invalid events go to ``engagement.dead-letter`` with a reason;
2. drop events already counted (event ids remembered in Redis for a window);
3. append the rest to the engagement log (exactly once: files are named by
   partition offset range, see :mod:`indexes.engagement_log`);
4. count them in Redis in one atomic Lua call per song, which also marks their
   event ids as seen (a replay after a crash counts nothing twice);
5. recompute the affected songs' feed entries;
6. flush dead letters, then commit offsets.

A crash between any two steps replays the batch and converges to the same
counters and the same log. Engagement for a song that has not been scored yet
is counted all the same: its counters wait in the song's hash for its scores.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Counter

from consumers.kafka_io import Publisher, dead_letter_record, ensure_topics, make_consumer
from consumers.worker import Message, Stopping, commit, retry_infra
from indexes.engagement_log import EngagementLog, LoggedEvent
from indexes.redis_engagement import CountedEvent, RedisEngagementCounters
from ranker.errors import InputError
from ranker.events import DeadLetter, Engagement
from ranker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENTS = Counter("apexrank_feedback_events_total", "Engagement events by outcome", ["outcome"])

#: Called with the song ids whose counters changed, to refresh their feed entries.
FeedUpdater = Callable[[Sequence[str]], None]


@dataclass
class FeedbackStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    logged: int = 0
    dead_by_code: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0  # wall time from the first message polled to the last commit


class FeedbackConsumer:
    """The Kafka loop for engagement events; see the module docstring for the write order."""

    def __init__(self, settings: Settings, on_engagement: FeedUpdater | None = None) -> None:
        self.settings = settings
        self.stats = FeedbackStats()
        self._stop = threading.Event()
        self.counters = RedisEngagementCounters.from_url(
            settings.redis.url.get_secret_value(),
            settings.redis.key_prefix,
            settings.feedback.dedup_window_s,
            settings.redis.socket_timeout_s,
        )
        self.log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
        self.on_engagement = on_engagement if on_engagement is not None else _default_feed_updater(settings)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_infra(what, fn, stop=self._stop, settings=self.settings.worker)

    def process(self, messages: Sequence[Message]) -> list[DeadLetter]:
        """Steps 1-5 for one batch; returns the dead letters to publish. Safe to repeat."""
        dead: list[DeadLetter] = []
        parsed: list[tuple[Message, Engagement]] = []
        for msg in messages:
            try:
                parsed.append((msg, Engagement.parse(msg.value)))  # type: ignore[arg-type]
            except InputError as exc:
                dead.append(
                    DeadLetter.build(
                        msg.value,
                        key=msg.key,
                        topic=msg.topic,
                        partition=msg.partition,
                        offset=msg.offset,
                        code=exc.code,
                        message=exc.message,
                    )
                )
        counted = [CountedEvent(e.event_id, e.song_id, e.type) for _, e in parsed]
        already = self.counters.seen(counted)
        fresh: dict[tuple[str, str], tuple[Message, Engagement]] = {}
        for msg, e in parsed:
            key = (e.song_id, e.event_id)
            if key not in already and key not in fresh:
                fresh[key] = (msg, e)
        self.stats.duplicates += len(parsed) - len(fresh)
        logged = self.log.append(
            [
                LoggedEvent(
                    event_id=e.event_id,
                    song_id=e.song_id,
                    user_id=e.user_id,
                    type=e.type,
                    ts=e.ts.astimezone(UTC),
                    feed=e.feed,
                    position=e.position,
                    partition=msg.partition,
                    offset=msg.offset,
                )
                for msg, e in fresh.values()
            ]
        )
        accepted = self.counters.apply(
            [CountedEvent(e.event_id, e.song_id, e.type) for _, e in fresh.values()],
            updated_at=datetime.now(UTC).isoformat(),
        )
        songs = sorted({e.song_id for e in accepted})
        if songs:
            self.on_engagement(songs)
        self.stats.logged += logged
        self.stats.accepted += len(accepted)
        EVENTS.labels("accepted").inc(len(accepted))
        EVENTS.labels("duplicate").inc(len(parsed) - len(fresh))
        return dead

    def run(self, until_idle_s: float | None = None) -> FeedbackStats:
        s = self.settings
        topics = s.kafka.topics
        if s.kafka.auto_create_topics:
            self._retry(
                "create topics",
                lambda: ensure_topics(s.kafka, [topics.engagement, topics.engagement_dead_letter]),
            )
        consumer = self._retry(
            "connect consumer",
            lambda: make_consumer(s.kafka, s.kafka.feedback_group_id, [topics.engagement], s.feedback.max_poll_records),
        )
        producer = Publisher(s.kafka)
        assigned: frozenset[Any] = frozenset()
        last_message = time.monotonic()
        first_message: float | None = None
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=s.feedback.poll_timeout_ms, max_records=s.feedback.max_poll_records)
                now_assigned = frozenset(consumer.assignment())
                if now_assigned != assigned:  # partitions moved: other members may have logged them
                    assigned = now_assigned
                    self.log.refresh()
                messages = [
                    Message(r.topic, r.partition, r.offset, r.key, r.value)
                    for tp in sorted(polled, key=lambda t: (t.topic, t.partition))
                    for r in polled[tp]
                ]
                if not messages:
                    if not assigned:
                        last_message = time.monotonic()
                    elif until_idle_s is not None and time.monotonic() - last_message >= until_idle_s:
                        break
                    continue
                last_message = time.monotonic()
                first_message = first_message or last_message
                try:
                    dead = self._retry("process", functools.partial(self.process, messages))

                    records = [dead_letter_record(topics.engagement_dead_letter, d) for d in dead]
                    self._retry("publish dead letters", functools.partial(producer.publish, records))
                    self._retry("commit offsets", lambda: commit(consumer))
                except Stopping:
                    log.warning("stopping with a batch uncommitted; it will be redelivered")
                    break
                self.stats.batches += 1
                self.stats.busy_s = time.monotonic() - first_message
                self.stats.messages += len(messages)
                self.stats.dead_letters += len(dead)
                for d in dead:
                    self.stats.dead_by_code[d.error_code] = self.stats.dead_by_code.get(d.error_code, 0) + 1
                EVENTS.labels("dead_letter").inc(len(dead))
        finally:
            producer.close()
            consumer.close(autocommit=False)
            self.counters.close()
        return self.stats


def _default_feed_updater(settings: Settings) -> FeedUpdater:
    """The ranker's incremental feed update, when it is available."""
    try:
        feeds = importlib.import_module("ranker.feeds")
    except ImportError:  # pragma: no cover - the ranker always ships feeds
        return lambda song_ids: None
    updater = getattr(feeds, "make_engagement_updater", None)
    if updater is None:
        return lambda song_ids: None
    result: FeedUpdater = updater(settings)
    return result
