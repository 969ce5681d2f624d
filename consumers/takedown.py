"""Takedown: ``apexrank songs delete ID... | --file F [--reason R]``, and the worker's handler for ``songs.deleted``.

A song that must come down (a rights claim, abuse) goes in two steps, each idempotent:

1. :func:`take_down`: the score store tombstones it and deletes it at once
   (:meth:`indexes.ScoreStore.delete_songs`: every configured feed and its age index, the
   song's hash with its scores, counters and calibration claims, whose share leaves the
   calibration totals); the change log makes every API process drop it from its song table.
   From then on a replayed ``songs.generated`` or engagement event for it is a no-op.
2. It publishes ``songs.deleted``. Each worker removes the song's embedding from its own
   shard's store (:func:`apply_deleted`); the FAISS index of that shard, and the API's readers
   of it, remove the vector as they catch up with the store.

``DELETE /v1/songs/{id}`` does the same from the API. After a failure, run it again: the
store step changes nothing twice and the event is published again (the workers' step is
idempotent too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from consumers import metrics
from consumers.kafka_io import Publisher, ensure_topics
from consumers.loop import Message, dead_letter
from indexes import ScoreStore
from ranker import stores
from ranker.errors import InputError
from ranker.events import DeadLetter, SongDeleted, is_valid_song_id
from ranker.settings import Settings

log = logging.getLogger(__name__)

#: Songs per store call and per publish (a --file may list many).
BATCH = 1000
DEFAULT_REASON = "takedown"


@dataclass
class TakedownReport:
    """What a takedown did: songs asked for, records deleted, songs already down, feed removals, events."""

    requested: int = 0
    removed: int = 0  # songs whose record (hash) existed and was deleted
    already_deleted: int = 0  # songs with a tombstone before this run (taken down again: a no-op)
    never_seen: int = 0  # tombstoned with no record and no feed entry: they stay out if they arrive
    feeds: dict[str, int] = field(default_factory=dict)  # feed -> songs removed from it
    published: int = 0  # songs.deleted events published

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_ids(song_ids: Sequence[str]) -> list[str]:
    """The ids, each once, in order; ValueError naming the invalid ones (nothing is deleted then)."""
    bad = [s for s in song_ids if not is_valid_song_id(s)]
    if bad:
        shown = ", ".join(repr(s) for s in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"invalid song id {shown}: 1-128 letters, digits or ._:-")
    return list(dict.fromkeys(song_ids))


def read_ids(path: Path) -> list[str]:
    """One song id per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def deleted_record(topic: str, event: SongDeleted) -> tuple[str, bytes, bytes]:
    """The ``songs.deleted`` record of one takedown (key: the song id, so a song's events stay in order)."""
    return topic, event.song_id.encode(), event.to_bytes()


def take_down(
    settings: Settings,
    song_ids: Sequence[str],
    reason: str = DEFAULT_REASON,
    *,
    store: ScoreStore | None = None,
    publisher: Publisher | None = None,
) -> TakedownReport:
    """Delete ``song_ids`` from the score store, then publish ``songs.deleted`` for each (see the module docstring).

    Raises ValueError for an invalid id or reason before anything is deleted; a store or Kafka
    failure propagates (run it again: it is idempotent).
    """
    ids = check_ids(song_ids)
    if not 1 <= len(reason) <= 256:
        raise ValueError("the reason must be 1-256 characters")
    report = TakedownReport(requested=len(ids))
    if not ids:
        return report
    topic = settings.kafka.topics.songs_deleted
    own_store = store is None
    score_store = store if store is not None else stores.score_store(settings)
    pub = publisher or Publisher(settings.kafka)
    try:
        if settings.kafka.auto_create_topics:
            ensure_topics(settings.kafka, [topic])
        for lo in range(0, len(ids), BATCH):
            chunk = ids[lo : lo + BATCH]
            deletions = score_store.delete_songs(chunk, reason, list(settings.feed.feeds))
            now = datetime.now(UTC)
            for d in deletions:
                report.removed += d.had_record
                report.already_deleted += d.already_deleted
                report.never_seen += not (d.had_record or d.feeds or d.already_deleted)
                for feed in d.feeds:
                    report.feeds[feed] = report.feeds.get(feed, 0) + 1
            events = [SongDeleted(song_id=s, reason=reason, deleted_at=now) for s in chunk]
            refused = pub.publish([deleted_record(topic, e) for e in events])
            if refused:  # a small event Kafka refuses is a broker setting to fix, not something to drop
                raise refused[0].error
            report.published += len(events)
        log.info("took down %d songs (%s): %s", len(ids), reason, report.to_dict())
        return report
    finally:
        if publisher is None:
            pub.close()
        if own_store:
            score_store.close()


# -- the worker's side ----------------------------------------------------------------------------
def parse_deleted(messages: Sequence[Message], max_original_bytes: int) -> tuple[list[SongDeleted], list[DeadLetter]]:
    """The ``songs.deleted`` events of a polled batch; a message that does not parse is a dead letter."""
    events: list[SongDeleted] = []
    dead: list[DeadLetter] = []
    for msg in messages:
        try:
            events.append(SongDeleted.parse(msg.value))  # type: ignore[arg-type]
        except InputError as exc:
            dead.append(dead_letter(msg, exc.code, exc.message, max_original_bytes))
    return events, dead


class DeletesEmbeddings(Protocol):
    """What holds a shard's embeddings: an :class:`~indexes.EmbeddingStore`, or the index over one."""

    def delete(self, song_ids: Sequence[str]) -> Mapping[str, int]: ...


def apply_deleted(embeddings: DeletesEmbeddings, events: Sequence[SongDeleted]) -> int:
    """Remove these songs' embeddings from this worker's shard (songs of other shards are not there:
    a no-op); how many were removed. Given the store, the shard's index drops the vectors as it
    catches up with it; given the index, at once."""
    removed = embeddings.delete([e.song_id for e in events])
    metrics.TAKEDOWNS.inc(len(removed))
    return len(removed)


# -- the command line -----------------------------------------------------------------------------
def run(settings: Settings, args: argparse.Namespace) -> int:
    """``apexrank songs delete``: prints the report (JSON with ``--json``); 2 on bad input."""
    try:
        ids = list(args.song_ids or [])
        if args.file:
            ids += read_ids(Path(args.file))
        if not ids:
            raise ValueError("name songs to delete: apexrank songs delete ID... or --file F")
        report = take_down(settings, ids, args.reason)
    except ValueError as exc:
        print(f"apexrank songs delete: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        feeds = ", ".join(f"{f}: {n}" for f, n in sorted(report.feeds.items())) or "none"
        print(
            f"taken down: {report.requested} songs ({report.removed} records deleted, {report.already_deleted} "
            f"already down, {report.never_seen} never seen); removed from feeds: {feeds}; "
            f"songs.deleted published: {report.published}"
        )
    return 0
