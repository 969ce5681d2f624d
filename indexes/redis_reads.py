"""The score store's read path on asyncio (the API's event loop): the same keys and results as
:class:`~indexes.redis_store.RedisScoreStore`'s, plus what an in-memory copy needs (a scan of
every song and feed, and the change log).

The store's URL picks the client (:func:`indexes.redis_client.connect_async`): one node, or
Redis Cluster (``redis+cluster://``), where the song scan visits every master and the change
log, one key, lives on one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions

from indexes.base import AsyncScoreReads, Change
from indexes.redis_client import UNREACHABLE, AsyncClient, connect_async, cross_slot
from indexes.redis_queries import HMGET_MANY, FieldsRead, as_record, factors, pairs, totals, window_query
from indexes.redis_schema import CALIBRATION_FIELDS, CHANGE_FEEDS, CHANGE_IDS

if TYPE_CHECKING:
    from indexes.redis_store import RedisScoreStore


class AsyncStoreReads(AsyncScoreReads):
    """The read path of :class:`RedisScoreStore` on ``redis.asyncio`` (for the API's event loop).

    Same keys and results as the synchronous methods of the same names.
    """

    def __init__(self, store: RedisScoreStore) -> None:
        self._store = store
        config = store.config
        self._redis: AsyncClient = connect_async(config.url, config.socket_timeout_s)
        self._hmget_many = self._redis.register_script(HMGET_MANY)
        self._script_ok = store.multi_key_scripts  # never on a cluster: a pipeline of per-song HMGETs

    async def feed_window(self, feed: str, max_score: float | None, count: int) -> list[tuple[str, float]]:
        return pairs(await self._redis.zrange(**window_query(self._store.feed_key(feed), max_score, count)))

    async def read_fields(self, song_ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]:
        """HMGET of many songs in one round trip (:class:`~indexes.redis_queries.FieldsRead`)."""
        if not song_ids:
            return []
        read = FieldsRead(self._store.keys, song_ids, fields)
        if self._script_ok:
            try:
                return read.replies(await self._hmget_many(keys=read.keys, args=read.fields))
            except redis.exceptions.ResponseError as exc:
                if not cross_slot(exc):
                    raise
                self._script_ok = False
        return read.replies(await read.queue(self._redis.pipeline(transaction=False)).execute())

    async def get_song(self, song_id: str) -> dict[str, str] | None:
        return as_record(await self._redis.hgetall(self._store.song_key(song_id)))

    async def feed_size(self, feed: str) -> int:
        return int(await self._redis.zcard(self._store.feed_key(feed)))

    async def calibration_totals(self) -> tuple[float, float]:
        return totals(await self._redis.hmget(self._store.calibration_key(), list(CALIBRATION_FIELDS)))

    async def generator_calibration(self) -> dict[str, float]:
        return factors(await self._redis.hgetall(self._store.keys.generator_calibration()))

    async def scan_song_ids(self, batch: int = 1000) -> AsyncIterator[list[str]]:
        keys = self._store.keys
        out: list[str] = []
        async for key in self._redis.scan_iter(match=keys.song_pattern(), count=batch):
            song_id = keys.song_id_of(key)
            if song_id is not None:
                out.append(song_id)
                if len(out) >= batch:
                    yield out
                    out = []
        if out:
            yield out

    async def scan_feed(self, feed: str, batch: int = 10_000) -> AsyncIterator[list[tuple[str, float]]]:
        key = self._store.feed_key(feed)
        cursor = 0
        while True:  # ZSCAN: every member present throughout is returned, whatever moves meanwhile
            cursor, rows = await self._redis.zscan(key, cursor, count=batch)
            if rows:
                yield pairs(rows)
            if not cursor:
                return

    async def feed_scores(self, feeds: Sequence[str], song_ids: Sequence[str]) -> dict[str, list[float | None]]:
        if not song_ids or not feeds:
            return {feed: [None] * len(song_ids) for feed in feeds}
        pipe = self._redis.pipeline(transaction=False)
        for feed in feeds:
            pipe.zmscore(self._store.feed_key(feed), list(song_ids))
        return {
            feed: [None if v is None else float(v) for v in values]
            for feed, values in zip(feeds, await pipe.execute(), strict=True)
        }

    async def change_position(self) -> str:
        newest = await self._redis.xrevrange(self._store.keys.changes(), count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def read_changes(self, after: str, count: int, block_s: float) -> list[Change]:
        # A blocking read longer than the socket timeout would time out instead of returning empty.
        block_s = min(block_s, self._store.config.socket_timeout_s / 2)
        block = max(1, int(block_s * 1000)) if block_s > 0 else None
        found: Any = await self._redis.xread({self._store.keys.changes(): after}, count=count, block=block)
        out: list[Change] = []
        for _, entries in found or ():
            for position, fields in entries:
                ids, feeds = fields.get(CHANGE_IDS, ""), fields.get(CHANGE_FEEDS, "")
                out.append(
                    Change(
                        position=str(position),
                        at=_stream_ms(position) / 1000.0,
                        song_ids=tuple(ids.split(",")) if ids else (),
                        feeds=tuple(feeds.split(",")) if feeds else (),
                    )
                )
        return out

    async def changes_lost(self, after: str) -> bool:
        key = self._store.keys.changes()
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
        oldest, newest = await pipe.execute()
        mark = _stream_id(after)
        if not newest:
            return mark != (0, 0)  # the log was deleted (or the store flushed)
        if _stream_id(newest[0][0]) < mark:
            return True  # the log was reset behind us
        # Entries after ``after`` may have been trimmed. From "0-0" (the log was empty when the
        # copy was read) nothing tells a trim from the log's start: a copy reads an entry within
        # a poll of loading, and ``after`` is a real entry from then on.
        return mark != (0, 0) and _stream_id(oldest[0][0]) > mark

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except UNREACHABLE:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _stream_id(position: str) -> tuple[int, int]:
    ms, _, seq = str(position).partition("-")
    return int(ms), int(seq or 0)


def _stream_ms(position: str) -> int:
    return _stream_id(position)[0]
