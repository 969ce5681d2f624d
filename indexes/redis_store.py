"""Redis score store: one hash per song and one sorted set per feed.

Key layout (Redis Cluster ready: the braces are hash tags, so each key's slot
depends only on the song id or feed name, and a client can route it)::

    {prefix}:song:{<song_id>}   hash: song_id, model_version, rank_score, generator,
                                created_at, scored_at, score.<task>..., <extra key>...
    {prefix}:feed:{<feed>}      sorted set: member song_id, score rank_score

Scores are stored as ``score.<task>`` fields so a task name can never collide
with a metadata field. ``extra`` values are stored under their own key (names
that clash with the fields above or start with ``score.`` are refused), strings
as-is and anything else JSON-encoded. A write merges fields (HSET): a replay
changes nothing, and fields written by other components into the same hash
survive; a field dropped by a newer model stays until overwritten.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from indexes.base import ScoreStore, SongRecord

# Song ids and feed names go inside a {hash tag}: a brace would end it early.
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,256}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SCORE_FIELD_PREFIX = "score."
RESERVED_FIELDS = frozenset(
    {"song_id", "model_version", "rank_score", "generator", "created_at", "scored_at"}
)


class RedisStoreConfig(BaseModel):
    """Connection and key-prefix settings for :class:`RedisScoreStore`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="redis://, rediss:// or unix:// URL.")
    key_prefix: str = "apexrank"
    socket_timeout_s: float = Field(5.0, gt=0)

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError("key_prefix may hold only letters, digits and ._:- (1-64 characters)")
        return value


def _check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} must be 1-256 letters, digits or ._:- (it sits in a Redis hash tag)"
        )
    return value


def song_fields(song: SongRecord) -> dict[str, str]:
    """The hash fields written for one song (all strings: what ``get_song`` reads back)."""
    fields: dict[str, str] = {
        "song_id": song.song_id,
        "model_version": song.model_version,
        "rank_score": repr(float(song.rank_score)),
        "generator": song.generator,
        "created_at": song.created_at,
        "scored_at": song.scored_at,
    }
    for task, value in song.scores.items():
        fields[SCORE_FIELD_PREFIX + task] = repr(float(value))
    for name, value in song.extra.items():
        if name in RESERVED_FIELDS or name.startswith(SCORE_FIELD_PREFIX):
            raise ValueError(f"song {song.song_id!r}: extra field {name!r} clashes with a reserved field")
        if isinstance(value, str):
            fields[name] = value
        else:
            try:
                fields[name] = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"song {song.song_id!r}: extra field {name!r} is not JSON: {exc}") from exc
    return fields


class RedisScoreStore(ScoreStore):
    """:class:`ScoreStore` on Redis (standalone or behind a proxy; keys are cluster-slot friendly).

    Connection and timeout errors propagate as ``redis.exceptions.ConnectionError``
    / ``TimeoutError`` so the worker can retry; writes are idempotent, so a retry
    after an unknown outcome is safe.
    """

    def __init__(self, config: RedisStoreConfig) -> None:
        self.config = config
        self.prefix = config.key_prefix
        self._redis: redis.Redis = redis.Redis.from_url(
            config.url,
            decode_responses=True,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
            health_check_interval=30,
        )

    # -- keys ---------------------------------------------------------------------------
    def song_key(self, song_id: str) -> str:
        return f"{self.prefix}:song:{{{_check_name('song id', song_id)}}}"

    def feed_key(self, feed: str) -> str:
        return f"{self.prefix}:feed:{{{_check_name('feed', feed)}}}"

    # -- writes -------------------------------------------------------------------------
    def write_songs(self, songs: Sequence[SongRecord], feed: str) -> None:
        """HSET every song's hash and ZADD it to ``feed``, in one pipelined round trip.

        Everything is validated before anything is sent, so a bad record cannot
        leave half a batch written.
        """
        feed_key = self.feed_key(feed)
        prepared: list[tuple[str, dict[str, str]]] = []
        members: dict[str, float] = {}
        for song in songs:
            if not math.isfinite(song.rank_score):
                raise ValueError(f"song {song.song_id!r}: rank_score must be finite, got {song.rank_score}")
            prepared.append((self.song_key(song.song_id), song_fields(song)))
            members[song.song_id] = float(song.rank_score)
        if not prepared:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, fields in prepared:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.zadd(feed_key, members)
        pipe.execute()

    # -- reads --------------------------------------------------------------------------
    def get_song(self, song_id: str) -> dict[str, str] | None:
        raw = self._redis.hgetall(self.song_key(song_id))
        return {str(k): str(v) for k, v in raw.items()} or None

    def feed_page(self, feed: str, start: int, count: int) -> list[tuple[str, float]]:
        """(song_id, rank_score) pairs, best first, from rank ``start`` (0-based)."""
        if start < 0:
            raise ValueError("start must be >= 0")
        if count <= 0:
            return []
        rows: list[Any] = self._redis.zrevrange(
            self.feed_key(feed), start, start + count - 1, withscores=True
        )
        return [(str(member), float(score)) for member, score in rows]

    def feed_size(self, feed: str) -> int:
        return int(self._redis.zcard(self.feed_key(feed)))

    def ping(self) -> bool:
        """True if Redis answers; False on a connection or timeout error (a health probe never raises)."""
        try:
            return bool(self._redis.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    def close(self) -> None:
        self._redis.close()

    @property
    def client(self) -> redis.Redis:
        """The underlying client (for callers that need other commands on the same connection pool)."""
        return self._redis
