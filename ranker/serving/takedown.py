"""What ``DELETE /v1/songs/{id}`` needs beside the store: the admin token check and publishing ``songs.deleted``.

The API publishes ``songs.deleted`` itself (the workers remove the vectors from it) through the
process's :class:`~ranker.serving.producer.ApiProducer`, which connects on first use, so an API
process that never takes a song down never connects to Kafka for it. With Kafka unreachable, a
takedown answers 503 after about ``kafka.request_timeout_ms``, not kafka-python's 30 s bootstrap wait.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from ranker.events import SongDeleted
from ranker.serving.producer import ApiProducer


def token_matches(given: str | None, tokens: Sequence[SecretStr]) -> bool:
    """Whether ``given`` is one of ``tokens``, compared with every one (the time says nothing about which)."""
    raw = (given or "").encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(raw, token.get_secret_value().encode())
    return ok and given is not None


class NotPublished(Exception):
    """The broker did not acknowledge every ``songs.deleted`` event."""


def publish_deleted(producer: ApiProducer, topic: str, events: Sequence[SongDeleted]) -> None:
    """Publish ``events`` keyed by song id (acks=all, flushed); :class:`NotPublished` unless all were acknowledged."""
    deliveries = producer.publish(topic, [(e.song_id.encode(), e.to_bytes()) for e in events])
    errors = [d.error for d in deliveries if d.error is not None]
    if errors:
        raise NotPublished(f"{len(errors)} of {len(events)} songs.deleted events not published: {errors[0]}")
