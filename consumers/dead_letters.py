"""``apexrank dead-letters list|replay``: summarise the dead letters, and republish their originals once fixed.

The worker writes a dead letter (:class:`ranker.events.DeadLetter`) to ``kafka.topics.dead_letter`` for
each ``songs.generated`` message it cannot score, and the feedback consumer writes one to
``kafka.topics.engagement_dead_letter`` for each ``engagement`` message it cannot count. A letter
holds the failed message's value (``original``, as text or base64), its key, the error code and the
reason. A song whose audio fetch failed transiently (5xx, 429, a timeout, a refused connection) is
dead-lettered only after the worker's retries (:mod:`consumers.retries`); its reason says how many
tries were made, and a replay starts the count again.

* ``list`` reads the dead-letter topics from the beginning up to the end offsets captured at start
  (it never waits for new letters) and prints, per topic and error code: how many, the first and last
  failure time, how many can be replayed, and a few example reasons.
* ``replay`` republishes the originals of the matching letters to the topic they failed on
  (``songs.generated`` or ``engagement``, as configured), with their original key. A letter whose
  original was truncated (only its first ``kafka.dead_letter_original_bytes`` were kept) cannot be
  replayed; neither can one whose original does not decode, does not match its recorded sha256, or
  does not parse as the source topic's event (replaying it would only dead-letter it again). Replay
  keeps no record of what it sent: replaying twice republishes twice, which the worker and the
  feedback consumer absorb (both are idempotent per song id and per event id).

``--since`` is an RFC 3339 time with a timezone (``2026-01-31T12:00:00Z``) or a duration back from now:
a number followed by ``s``, ``m``, ``h``, ``d`` or ``w`` (``90m``, ``2h``, ``3d``). It keeps the letters
that failed at or after that time.

Kafka is imported inside the functions that talk to it: importing this module loads no Kafka client.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from consumers.durations import parse_since
from ranker.errors import InputError

if TYPE_CHECKING:
    from ranker.events import DeadLetter
    from ranker.settings import KafkaSettings, Settings

#: ``--topic`` choices: the dead-letter topic setting and the source topic setting of each.
TOPICS: dict[str, tuple[str, str]] = {
    "songs": ("dead_letter", "songs_generated"),
    "engagement": ("engagement_dead_letter", "engagement"),
}
#: Example reasons shown per error code.
EXAMPLES = 3


# -- reading ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One record of a dead-letter topic: the parsed letter, or why it did not parse."""

    topic: str
    partition: int
    offset: int
    letter: DeadLetter | None
    error: str | None = None


def read_topic_to_end(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[tuple[int, int, bytes | None]]:
    """Every record of ``topic`` from the beginning up to the end offsets captured at start.

    Returns ``(partition, offset, value)`` in partition and offset order. A topic that does not exist
    reads as empty (it is not created). Reading stops once every partition's position reaches the end
    captured at start, so it never waits for new records; a broker that does not deliver up to those
    offsets within ``timeout_s`` raises.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaTimeoutError

    consumer = KafkaConsumer(
        group_id=None, enable_auto_commit=False, allow_auto_create_topics=False, **kafka.client_kwargs()
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        if not partitions:
            return []
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions, timeout_ms=int(timeout_s * 1000))
        starts = consumer.beginning_offsets(partitions, timeout_ms=int(timeout_s * 1000))
        pending = {tp for tp in partitions if ends[tp] > starts[tp]}
        for tp in partitions:
            if tp in pending:
                consumer.seek(tp, starts[tp])
            else:
                consumer.pause(tp)
        out: list[tuple[int, int, bytes | None]] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"reading {topic}: partitions {sorted(tp.partition for tp in pending)} did not reach their "
                    f"end offsets within {timeout_s:g} s"
                )
            # Every record a poll returns is kept, even past the end captured: the embedded Tansu reports
            # as a partition's end the last record batch's base offset + 1 (a batch of 4 at offset 0 ends
            # at "1"), so the end's whole batch must be read. A real broker's end is exact; what passes it
            # here is at most one fetch of letters written since the start.
            for tp, records in consumer.poll(timeout_ms=500).items():
                out.extend((tp.partition, r.offset, r.value) for r in records)
            for tp in list(pending):
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
        return sorted(out, key=lambda r: (r[0], r[1]))
    finally:
        consumer.close()


def read_letters(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[Record]:
    """The dead-letter topic's records, each parsed as a :class:`DeadLetter` (schema version 1 or 2)."""
    from pydantic import ValidationError

    from ranker.events import DeadLetter

    out: list[Record] = []
    for partition, offset, value in read_topic_to_end(kafka, topic, timeout_s):
        try:
            letter = DeadLetter.model_validate_json(value or b"")
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]["msg"] if exc.errors() else str(exc)
            out.append(Record(topic, partition, offset, None, f"not a dead letter: {reason}"))
            continue
        out.append(Record(topic, partition, offset, letter))
    return out


def matches(letter: DeadLetter, codes: Sequence[str] | None, since: datetime | None) -> bool:
    return (not codes or letter.error_code in codes) and (since is None or letter.failed_at >= since)


# -- what a letter can replay ------------------------------------------------------------
def original_of(letter: DeadLetter, source_setting: str) -> tuple[bytes | None, str]:
    """The letter's original message value, or None and why it cannot be replayed.

    The reason starts with ``truncated`` or ``unparseable``.
    """
    from ranker.events import Engagement, SongGenerated

    if letter.original_truncated:
        kept = len(letter.original_bytes()) if letter.original else 0
        return None, f"truncated: the letter keeps {kept} of {letter.original_length} bytes of the original"
    try:
        raw = (
            base64.b64decode(letter.original, validate=True)
            if letter.original_encoding == "base64"
            else letter.original.encode("utf-8")
        )
    except (binascii.Error, ValueError) as exc:
        return None, f"unparseable: the original does not decode as {letter.original_encoding} ({exc})"
    if letter.original_length is not None and len(raw) != letter.original_length:
        return None, f"unparseable: the original has {len(raw)} bytes, the letter says {letter.original_length}"
    if letter.original_sha256 is not None and hashlib.sha256(raw).hexdigest() != letter.original_sha256:
        return None, "unparseable: the original does not match the letter's sha256"
    try:
        (SongGenerated if source_setting == "songs_generated" else Engagement).parse(raw)
    except InputError as exc:
        return None, f"unparseable: the original is not a valid event ({exc})"
    return raw, "ok"


# -- the report ------------------------------------------------------------------------
@dataclass
class CodeSummary:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    replayable: int = 0
    truncated: int = 0
    unparseable: int = 0
    republished: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, letter: DeadLetter, verdict: str) -> None:
        self.count += 1
        self.first = letter.failed_at if self.first is None else min(self.first, letter.failed_at)
        self.last = letter.failed_at if self.last is None else max(self.last, letter.failed_at)
        if verdict == "ok":
            self.replayable += 1
        elif verdict.startswith("truncated"):
            self.truncated += 1
        else:
            self.unparseable += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"key": letter.key, "message": letter.message, "replay": verdict})

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "replayable": self.replayable,
            "truncated": self.truncated,
            "unparseable": self.unparseable,
            "republished": self.republished,
            "examples": self.examples,
        }


@dataclass
class TopicReport:
    name: str  # the --topic choice
    dead_letter_topic: str
    source_topic: str
    letters: int = 0  # records read from the dead-letter topic
    matched: int = 0
    not_letters: int = 0  # records that are not dead letters at all
    codes: dict[str, CodeSummary] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.name,
            "dead_letter_topic": self.dead_letter_topic,
            "source_topic": self.source_topic,
            "letters": self.letters,
            "matched": self.matched,
            "not_letters": self.not_letters,
            "replayable": sum(c.replayable for c in self.codes.values()),
            "republished": sum(c.republished for c in self.codes.values()),
            "skipped_truncated": {k: c.truncated for k, c in self.codes.items() if c.truncated},
            "skipped_unparseable": {k: c.unparseable for k, c in self.codes.items() if c.unparseable},
            "codes": {k: c.to_dict() for k, c in sorted(self.codes.items())},
        }


def _selected(args: argparse.Namespace) -> list[str]:
    return [args.topic] if args.topic else list(TOPICS)


def _since(args: argparse.Namespace) -> datetime | None:
    return parse_since(args.since) if args.since else None


def build_reports(
    settings: Settings, names: Sequence[str], codes: Sequence[str] | None, since: datetime | None
) -> tuple[list[TopicReport], dict[str, list[tuple[bytes | None, bytes]]]]:
    """Per topic: the summary of the matching letters, and the ``(key, value)`` originals that can be replayed."""
    topics = settings.kafka.topics
    reports: list[TopicReport] = []
    originals: dict[str, list[tuple[bytes | None, bytes]]] = {}
    for name in names:
        letter_setting, source_setting = TOPICS[name]
        report = TopicReport(name, getattr(topics, letter_setting), getattr(topics, source_setting))
        replay: list[tuple[bytes | None, bytes]] = []
        for rec in read_letters(settings.kafka, report.dead_letter_topic):
            report.letters += 1
            if rec.letter is None:
                report.not_letters += 1
                continue
            if not matches(rec.letter, codes, since):
                continue
            report.matched += 1
            raw, verdict = original_of(rec.letter, source_setting)
            report.codes.setdefault(rec.letter.error_code, CodeSummary()).add(rec.letter, verdict)
            if raw is not None:
                key = rec.letter.key.encode("utf-8") if rec.letter.key is not None else None
                replay.append((key, raw))
        reports.append(report)
        originals[report.dead_letter_topic] = replay
    return reports, originals


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if t else "-"


def print_list(reports: Sequence[TopicReport]) -> None:
    for r in reports:
        print(f"{r.dead_letter_topic} (from {r.source_topic}): {r.matched} matching of {r.letters} letters")
        if r.not_letters:
            print(f"  {r.not_letters} records are not dead letters and were ignored")
        if not r.codes:
            continue
        width = max(len("code"), *(len(c) for c in r.codes))
        print(f"  {'code':<{width}}  {'count':>6}  {'first':<20}  {'last':<20}  {'replayable':>10}  truncated")
        for code, c in sorted(r.codes.items(), key=lambda kv: (-kv[1].count, kv[0])):
            print(
                f"  {code:<{width}}  {c.count:>6}  {_when(c.first):<20}  {_when(c.last):<20}  "
                f"{c.replayable:>10}  {c.truncated}"
            )
        for code, c in sorted(r.codes.items()):
            for ex in c.examples:
                print(f"    {code}: key {ex['key']!r}: {ex['message'][:200]}")


def print_replay(reports: Sequence[TopicReport], dry_run: bool) -> None:
    verb = "would republish" if dry_run else "republished"
    for r in reports:
        n = sum(c.replayable for c in r.codes.values())
        truncated = sum(c.truncated for c in r.codes.values())
        unparseable = sum(c.unparseable for c in r.codes.values())
        print(
            f"{r.dead_letter_topic} -> {r.source_topic}: {verb} {n} of {r.matched} matching letters; "
            f"skipped {truncated} truncated, {unparseable} unparseable"
        )
        for code, c in sorted(r.codes.items()):
            parts = [f"{verb} {c.replayable}"]
            if c.truncated:
                parts.append(f"{c.truncated} not replayable: the original was truncated in the letter")
            if c.unparseable:
                parts.append(f"{c.unparseable} not replayable: the original is unparseable")
            print(f"  {code}: " + "; ".join(parts))
        if r.not_letters:
            print(f"  {r.not_letters} records are not dead letters and were ignored")


def republish(kafka: KafkaSettings, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> int:
    """Send ``(key, value)`` records to ``topic`` and flush; a failed send raises (nothing is half-reported)."""
    from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer

    if not records:
        return 0
    if kafka.auto_create_topics:
        ensure_topics(kafka, [topic])
    producer = make_producer(kafka)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        flush_or_raise(producer, futures)
    finally:
        producer.close(timeout=10)
    return len(records)


# -- the commands ----------------------------------------------------------------------
def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    reports, _ = build_reports(settings, _selected(args), args.code, _since(args))
    if args.json:
        print(json.dumps({"topics": [r.to_dict() for r in reports]}, indent=2))
    else:
        print_list(reports)
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    reports, originals = build_reports(settings, _selected(args), args.code, _since(args))
    for r in reports:
        if args.dry_run:
            continue
        republish(settings.kafka, r.source_topic, originals[r.dead_letter_topic])
        for c in r.codes.values():  # every replayable original was sent (a failed send raised)
            c.republished = c.replayable
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "topics": [r.to_dict() for r in reports]}, indent=2))
    else:
        print_replay(reports, args.dry_run)
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Dispatch ``apexrank dead-letters list|replay``."""
    return {"list": cmd_list, "replay": cmd_replay}[args.dead_letters_cmd](settings, args)
