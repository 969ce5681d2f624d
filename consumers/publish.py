"""Publish ``songs.generated`` events for the songs of a catalog (backfills, demo, benchmarks)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer
from ranker.catalog import CatalogError, read_catalog
from ranker.events import SongGenerated
from ranker.settings import Settings

#: Bad rows named in a catalog error; the rest are counted.
_SHOWN = 10


def catalog_events(path: Path, limit: int | None = None) -> list[SongGenerated]:
    """The events of a catalog's rows; rows that make no valid event raise :class:`CatalogError` naming
    them (0-based, as :func:`read_catalog` counts), so that nothing is published from a half-bad file."""
    catalog = read_catalog(path)
    events = []
    problems: list[str] = []
    for i, row in enumerate(catalog.rows()[:limit]):
        try:
            events.append(_event(row))
        except ValueError as exc:  # pydantic's ValidationError is one too
            problems.append(f"row {i}: {_reason(exc)}")
    if problems:
        more = f"; and {len(problems) - _SHOWN} more rows" if len(problems) > _SHOWN else ""
        raise CatalogError(f"catalog {path}: {'; '.join(problems[:_SHOWN])}{more}")
    return events


def _event(row: dict[str, Any]) -> SongGenerated:
    created = row["created_at"]
    if isinstance(created, str):
        try:
            created = datetime.fromisoformat(created)
        except ValueError:
            raise ValueError(f"created_at: {created!r} is not an ISO 8601 time") from None
    if isinstance(created, datetime) and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return SongGenerated(
        song_id=row["song_id"],
        audio_uri=row["audio_uri"],
        generator=row["generator"],
        created_at=created,
        title=row.get("title"),
        duration_s=row.get("duration_s"),
        tags=[t for t in [row.get("style")] if t],
    )


def _reason(exc: ValueError) -> str:
    """One line per bad row: pydantic's multi-line report folded to ``field: message`` pairs."""
    if isinstance(exc, ValidationError):
        return ", ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


def publish_events(settings: Settings, events: list[SongGenerated], raw: list[bytes] | None = None) -> int:
    """Send events (and optional raw payloads, e.g. deliberately bad ones) to songs.generated."""
    topic = settings.kafka.topics.songs_generated
    if settings.kafka.auto_create_topics:
        ensure_topics(settings.kafka, [topic])
    producer = make_producer(settings.kafka)
    try:
        futures = [producer.send(topic, key=e.song_id.encode(), value=e.to_bytes()) for e in events]
        futures += [producer.send(topic, value=r) for r in raw or []]
        flush_or_raise(producer, futures)
    finally:
        producer.close(timeout=10)
    return len(events) + len(raw or [])


def publish_catalog(settings: Settings, path: Path, limit: int | None = None) -> int:
    return publish_events(settings, catalog_events(path, limit))
