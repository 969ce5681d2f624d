"""The score store's reads, built once for both clients: the synchronous store
(:mod:`indexes.redis_store`) and the asyncio read path (:mod:`indexes.redis_reads`) differ only in
how they send these commands and wait for the replies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from indexes.redis_schema import RedisKeys

P = TypeVar("P")

# KEYS = song hashes, ARGV = field names: HMGET of each, in order (read-only).
HMGET_MANY = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return out
"""


class FieldsRead:
    """HMGET of the same fields of many songs, in one round trip.

    Where one node holds every key, one read-only call of :data:`HMGET_MANY` (packing one command
    instead of one per song is most of the client's cost); where the keys span cluster slots
    (Redis Cluster, or a proxy that refuses them), a pipeline of per-song HMGETs.
    """

    def __init__(self, keys: RedisKeys, song_ids: Sequence[str], fields: Sequence[str]) -> None:
        self.keys = [keys.song(s) for s in song_ids]
        self.fields = list(fields)

    def queue(self, pipe: P) -> P:
        """``pipe`` with one HMGET per song queued (a sync or an asyncio pipeline)."""
        for key in self.keys:
            pipe.hmget(key, self.fields)  # type: ignore[attr-defined]
        return pipe

    @staticmethod
    def replies(out: Any) -> list[list[str | None]]:
        """The per-song value lists, in order (the script's reply and the pipeline's are alike)."""
        return list(out)


def window_query(key: str, max_score: float | None, count: int) -> dict[str, Any]:
    """ZRANGE arguments of a feed window: up to ``count`` members with score <= ``max_score``, best first."""
    bound = "+inf" if max_score is None else repr(float(max_score))
    return {
        "name": key,
        "start": bound,
        "end": "-inf",
        "desc": True,
        "byscore": True,
        "offset": 0,
        "num": count,
        "withscores": True,
    }


def pairs(rows: Any) -> list[tuple[str, float]]:
    """(member, score) rows of a sorted set as (song_id, score)."""
    return [(str(member), float(score)) for member, score in rows]


def factors(raw: Mapping[Any, Any]) -> dict[str, float]:
    """A generator-factor hash as read: the finite, positive factors (anything else reads as absent)."""
    out: dict[str, float] = {}
    for name, value in raw.items():
        try:
            factor = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(factor) and factor > 0:
            out[name.decode() if isinstance(name, bytes) else str(name)] = factor
    return out


def totals(values: Sequence[Any]) -> tuple[float, float]:
    """The calibration hash's (likes, expected) fields as numbers (0 where absent)."""
    likes, expected = values
    return float(likes or 0.0), float(expected or 0.0)


def as_record(raw: Mapping[Any, Any]) -> dict[str, str] | None:
    """An HGETALL reply as a song's record (strings), or None for a song with no hash."""
    return {str(k): str(v) for k, v in raw.items()} or None
