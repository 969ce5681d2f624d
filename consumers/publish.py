"""Publish ``songs.generated`` events for the songs of a catalog (backfills, demo, benchmarks)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer
from ranker.catalog import read_catalog
from ranker.events import SongGenerated
from ranker.settings import Settings


def catalog_events(path: Path, limit: int | None = None) -> list[SongGenerated]:
    catalog = read_catalog(path)
    events = []
    for row in catalog.rows()[:limit]:
        created = row["created_at"]
        if isinstance(created, str):
            created = datetime.fromisoformat(created)
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        events.append(
            SongGenerated(
                song_id=row["song_id"],
                audio_uri=row["audio_uri"],
                generator=row["generator"],
                created_at=created,
                title=row.get("title"),
                duration_s=row.get("duration_s"),
                tags=[t for t in [row.get("style")] if t],
            )
        )
    return events


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
