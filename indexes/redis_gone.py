"""Which songs left the Redis score store: a tombstone (:mod:`indexes.redis_tombstones`), or a hash
marked expired (:mod:`indexes.redis_retention`).

One pipelined round trip whatever is asked: per song an ``EXISTS`` of its tombstone and/or an
``HEXISTS`` of its hash's ``expired_at``. Both keys sit in the song's slot: on Redis Cluster the
client sends each master its songs' commands, and the answer is still one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from indexes.base import Gone
from indexes.redis_schema import EXPIRED_AT

if TYPE_CHECKING:
    from indexes.redis_store import RedisScoreStore


def gone(store: RedisScoreStore, song_ids: Sequence[str], *, deleted: bool = True, expired: bool = True) -> Gone:
    """Which of ``song_ids`` have a tombstone (if ``deleted``) and which an expired hash (if
    ``expired``); with both, a song with a tombstone counts as deleted only. Ids repeat freely."""
    ids = list(dict.fromkeys(song_ids))
    if not ids or not (deleted or expired):
        return Gone()
    keys = store.keys
    pipe = store.client.pipeline(transaction=False)
    for s in ids:
        if deleted:
            pipe.exists(keys.tombstone(s, check=False))
        if expired:
            pipe.hexists(keys.song(s, check=False), EXPIRED_AT)
    per_song = int(deleted) + int(expired)
    replies = pipe.execute()
    tombstoned: set[str] = set()
    shrunk: set[str] = set()
    for i, s in enumerate(ids):
        row = replies[i * per_song : (i + 1) * per_song]  # [EXISTS tombstone][, HEXISTS expired_at]
        if deleted and row[0]:
            tombstoned.add(s)
        elif expired and row[-1]:
            shrunk.add(s)
    return Gone(frozenset(tombstoned), frozenset(shrunk))
