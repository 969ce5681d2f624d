"""Per-song engagement counters in Redis, with event-id deduplication in the same atomic step.

Counters are fields of the song's hash (``eng.plays``, ``eng.likes``, ...), so a
song that has not been scored yet still keeps its engagement (the hash exists
before its scores do); keys and fields are :mod:`indexes.redis_schema`'s. For each
event a Lua script sets the dedup key
``{prefix}:evt:{<song_id>}:<event_id>`` with NX and a TTL, its value naming the
message that carried the event (:func:`message_marker`: partition and offset packed
into one integer, which Redis stores without a string allocation), and only if that
key was new increments the counter. Each event comes back with a status:

* ``NEW``: counted now;
* ``REPLAY``: counted earlier by this very message (the batch is being replayed after
  a crash): not counted again, but the caller still owes it its other writes
  (the engagement log, the feed);
* ``DUPLICATE``: counted earlier by another message (a redelivered or republished event);
* ``TOMBSTONED``: the song was taken down (its tombstone ``{prefix}:gone:{<song_id>}`` exists,
  checked in the same script): nothing is written, no dedup key, no counter, no hash.

A replayed batch therefore counts nothing twice, and the caller can still finish
what the crash interrupted.

A new play also adds its page position's examination weight (the weights stored at
``{prefix}:examination`` by ``apexrank retrain``, re-read every ``examination_refresh_s``;
1 for a play of unknown position) to the song's examined plays ``eng.eplays``, in the same
step, so they are exactly-once like the plays (docs/ranking.md, "Position-aware evidence").

One script call per batch: on a single Redis node (or a proxy that allows it) every
event of the batch goes into one call, a few thousand keys at a time. Dedup keys share
their song's hash tag, so on Redis Cluster (a ``redis+cluster://`` URL: redis-py's
``RedisCluster``, see :mod:`indexes.redis_client`), where a multi-slot script is refused
(CROSSSLOT, e.g. behind a cluster proxy) or with ``per_song=True``, the same script runs
once per song, pipelined, each call touching a single slot.

Before any write, the script reads every counter it will change, so a failing call (a key
of the wrong type) writes nothing: no dedup key is ever left without its count.

A hash the script creates (engagement for a song not scored yet, or one whose retained history
already expired) expires after ``orphan_ttl_s`` unless a score write makes it a song's record
(the score store's writes clear the TTL). Late events for long-gone songs and events for songs
never scored therefore cannot grow Redis without bound.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any, ClassVar

import redis.exceptions
from pydantic import BaseModel, ConfigDict, Field

from indexes.base import DUPLICATE, NEW, REPLAY, TOMBSTONED, EngagementCounters, message_marker
from indexes.redis_client import SyncClient, connect, cross_slot, is_cluster_url, run_script_calls
from indexes.redis_schema import (
    COUNTER_FIELDS,
    ENGAGEMENT_COUNTERS,
    EXAMINED_PLAYS_FIELD,
    PLAYS_FIELD,
    RedisKeys,
    counter_field,
    examination_json,
    lua,
    parse_examination,
)

__all__ = [
    "CHUNK",
    "COUNTERS",
    "COUNTER_FIELDS",
    "DUPLICATE",
    "NEW",
    "REPLAY",
    "TOMBSTONED",
    "RedisEngagementConfig",
    "RedisEngagementCounters",
    "message_marker",
]

#: The counters :meth:`RedisEngagementCounters.counts` reports.
COUNTERS = ENGAGEMENT_COUNTERS
#: Events per script call on a single node (bounds how long one call holds Redis).
CHUNK = 5000

_LUA_FIELDS = ", ".join(f"['{t}'] = {{'{f}', {d}}}" for t, (f, d) in COUNTER_FIELDS.items())

# KEYS = the song hashes (n_songs of them), their tombstones (n_songs), then one dedup key per event.
# ARGV = ttl, updated_at, n_songs, orphan TTL in ms (0: none), then per event: song index (1-based),
# type, marker, examination weight (what a new play adds to the examined plays).
# Returns one status character per event (n, r, d, x: tombstoned). Counters are read once per song and
# field, changed in event order (a count that would go below zero stays at zero, as with
# HINCRBY and a floor after each event) and written back with one HSET per song. The examined plays
# (a float) start from the plays where the hash has none yet (plays counted before weights existed count 1).
_SCRIPT = lua(
    "local FIELDS = {" + _LUA_FIELDS + "}\n"
    """local ttl = tonumber(ARGV[1])
local n_songs = tonumber(ARGV[3])
-- Pass 1, reads only: everything that can fail (a key of the wrong type, an unknown event type)
-- fails here, before anything is written, so an error never leaves dedup keys without their counts.
local counts = {}
local eplays = {}
local gone = {}
local fresh = {}
for s = 1, n_songs do
  gone[s] = redis.call('EXISTS', KEYS[n_songs + s]) == 1
  fresh[s] = redis.call('EXISTS', KEYS[s]) == 0
end
local a = 5
for i = 2 * n_songs + 1, #KEYS do
  local song, kind = tonumber(ARGV[a]), ARGV[a + 1]
  a = a + 4
  local fd = FIELDS[kind]
  if not fd then return redis.error_reply('unknown engagement type ' .. tostring(kind)) end
  local c = counts[song]
  if not c then
    c = {}
    counts[song] = c
  end
  if c[fd[1]] == nil then c[fd[1]] = tonumber(redis.call('HGET', KEYS[song], fd[1])) or 0 end
  if fd[1] == '$plays' and eplays[song] == nil then
    eplays[song] = tonumber(redis.call('HGET', KEYS[song], '$eplays')) or c[fd[1]]
  end
end
-- Pass 2: deduplicate and count in memory, then one HSET per song with a new event.
local out = {}
local changed = {}
a = 5
for i = 2 * n_songs + 1, #KEYS do
  local song, kind, marker = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local weight = tonumber(ARGV[a + 3])
  a = a + 4
  if gone[song] then
    out[#out + 1] = 'x'
  elseif redis.call('SET', KEYS[i], marker, 'NX', 'EX', ttl) then
    local fd = FIELDS[kind]
    local c = counts[song]
    local v = c[fd[1]] + fd[2]
    if v < 0 then v = 0 end
    c[fd[1]] = v
    if fd[1] == '$plays' then eplays[song] = eplays[song] + weight end
    changed[song] = true
    out[#out + 1] = 'n'
  elseif redis.pcall('GET', KEYS[i]) == marker then  -- pcall: a foreign key there is a duplicate
    out[#out + 1] = 'r'
  else
    out[#out + 1] = 'd'
  end
end
for song, _ in pairs(changed) do
  local args = {'$updated', ARGV[2]}
  for f, v in pairs(counts[song]) do
    args[#args + 1] = f
    args[#args + 1] = string.format('%d', v)
  end
  if eplays[song] ~= nil then
    args[#args + 1] = '$eplays'
    args[#args + 1] = string.format('%.17g', eplays[song])
  end
  redis.call('HSET', KEYS[song], unpack(args))
  if fresh[song] and tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[song], ARGV[4]) end
end
return table.concat(out)
"""
)


class RedisEngagementConfig(BaseModel):
    """Connection, key prefix and dedup window of :class:`RedisEngagementCounters`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        description="redis://, rediss:// or unix:// URL (one node), or redis+cluster://host:port[,host:port...] "
        "or rediss+cluster:// (Redis Cluster)."
    )
    key_prefix: str = "apexrank"
    dedup_window_s: int = Field(gt=0, description="How long an event id is remembered.")
    orphan_ttl_s: int | None = Field(
        None, gt=0, description="A hash the counters create expires this long after, unless a score write keeps it."
    )
    socket_timeout_s: float = Field(5.0, gt=0)
    examination_refresh_s: float = Field(
        60.0, gt=0, description="How often the stored examination weights are re-read (settings.examination.refresh_s)."
    )


class RedisEngagementCounters(EngagementCounters):
    """Atomic, deduplicated counter updates; keys compatible with the score store's layout."""

    #: The options :func:`indexes.open_engagement_counters` validates for this backend.
    config_type: ClassVar[type[BaseModel]] = RedisEngagementConfig

    def __init__(
        self,
        client: SyncClient | Callable[[], SyncClient],
        key_prefix: str,
        dedup_window_s: int,
        per_song: bool = False,
        orphan_ttl_s: int | None = None,
        examination_refresh_s: float = 60.0,
    ) -> None:
        """``client``: a client, or what makes one on first use (a cluster client connects when made)."""
        #: How long the examination weights read from Redis are used before they are read again.
        self.examination_refresh_s = float(examination_refresh_s)
        self._weights_cache: list[float] | None = None
        self._weights_at: float | None = None
        self._connect: Callable[[], SyncClient] = client if callable(client) else lambda: client
        self.prefix = key_prefix
        self.keys = RedisKeys(key_prefix)
        self.ttl = int(dedup_window_s)
        self.orphan_ttl_ms = 0 if orphan_ttl_s is None else int(orphan_ttl_s * 1000)
        #: One script call per song (Redis Cluster) instead of one per batch; set on CROSSSLOT too.
        self.per_song = per_song

    @cached_property
    def client(self) -> SyncClient:
        return self._connect()

    @cached_property
    def _script(self) -> Any:
        return self.client.register_script(_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        key_prefix: str,
        dedup_window_s: int,
        socket_timeout_s: float = 5.0,
        orphan_ttl_s: int | None = None,
        examination_refresh_s: float = 60.0,
    ) -> RedisEngagementCounters:
        """Counters on ``url``: one node, or Redis Cluster (``redis+cluster://``: one song per call from the start).
        Connects on first use, so the counters can be made while Redis is down."""
        return cls(
            lambda: connect(url, socket_timeout_s),
            key_prefix,
            dedup_window_s,
            per_song=is_cluster_url(url),
            orphan_ttl_s=orphan_ttl_s,
            examination_refresh_s=examination_refresh_s,
        )

    @classmethod
    def from_config(cls, config: RedisEngagementConfig) -> RedisEngagementCounters:
        return cls.from_url(
            config.url,
            config.key_prefix,
            config.dedup_window_s,
            config.socket_timeout_s,
            config.orphan_ttl_s,
            config.examination_refresh_s,
        )

    def song_key(self, song_id: str) -> str:
        """The song's hash (ids come validated by the event schema)."""
        return self.keys.song(song_id, check=False)

    def _event_key(self, song_id: str, event_id: str) -> str:
        return self.keys.event(song_id, event_id)

    def count(
        self,
        song_ids: Sequence[str],
        event_ids: Sequence[str],
        types: Sequence[str],
        markers: Sequence[str],
        updated_at: str,
        positions: Sequence[int | None] | None = None,
    ) -> str:
        """Count the events not seen within the window; one status per event, in input order.

        The sequences are parallel: event ``i`` is ``event_ids[i]`` for ``song_ids[i]``, of
        ``types[i]`` (a key of :data:`COUNTER_FIELDS`), carried by the message ``markers[i]``
        (unique per message: :func:`message_marker`), shown at ``positions[i]`` (None: unknown).
        Returns a string with :data:`NEW`, :data:`REPLAY`, :data:`DUPLICATE` or :data:`TOMBSTONED`
        for each event. A repeat of an event inside the batch is a duplicate too.
        """
        n = len(event_ids)
        if not n:
            return ""
        if positions is not None and len(positions) != n:
            raise ValueError(f"{n} events but {len(positions)} positions")
        weights = self._weights(types, positions)
        if not self.per_song:
            try:
                return "".join(
                    self._call(song_ids, event_ids, types, markers, weights, lo, min(n, lo + CHUNK), updated_at)
                    for lo in range(0, n, CHUNK)
                )
            except redis.exceptions.ResponseError as exc:
                if not cross_slot(exc):
                    raise
                self.per_song = True  # Redis Cluster: one slot per call from now on
        return self._count_per_song(song_ids, event_ids, types, markers, weights, updated_at)

    def _weights(self, types: Sequence[str], positions: Sequence[int | None] | None) -> list[str]:
        """What each event adds to its song's examined plays if it is a new play (as the script reads it)."""
        if positions is None:
            return ["1"] * len(types)
        table = self._examination_weights()
        if table is None:
            return ["1"] * len(types)
        last = len(table) - 1
        return [
            "1" if k is None or t != "play" or k < 0 else repr(table[k if k < last else last])
            for t, k in zip(types, positions, strict=True)
        ]

    def _examination_weights(self) -> list[float] | None:
        """The stored weights, re-read at most every ``examination_refresh_s``."""
        now = time.monotonic()
        if self._weights_at is None or now - self._weights_at >= self.examination_refresh_s:
            self._weights_cache = self.examination()
            self._weights_at = now
        return self._weights_cache

    def examination(self) -> list[float] | None:
        return parse_examination(self.client.get(self.keys.examination()))

    def set_examination(self, weights: Sequence[float]) -> None:
        self.client.set(self.keys.examination(), examination_json(weights))
        self._weights_at = None  # this process counts with them from its next batch

    def examined_plays(self, song_ids: Iterable[str]) -> dict[str, float]:
        ids = list(song_ids)
        pipe = self.client.pipeline(transaction=False)
        for song_id in ids:
            pipe.hmget(self.song_key(song_id), [PLAYS_FIELD, EXAMINED_PLAYS_FIELD])
        out: dict[str, float] = {}
        for song_id, (plays, eplays) in zip(ids, pipe.execute(), strict=True):
            out[song_id] = float(eplays) if eplays is not None else float(plays or 0)
        return out

    def _call(
        self,
        song_ids: Sequence[str],
        event_ids: Sequence[str],
        types: Sequence[str],
        markers: Sequence[str],
        weights: Sequence[str],
        lo: int,
        hi: int,
        updated_at: str,
    ) -> str:
        """Events ``lo:hi`` in one script call."""
        slots: dict[str, int] = {}
        keys: list[str] = []
        args: list[str | int] = [self.ttl, updated_at, 0, self.orphan_ttl_ms]
        for i in range(lo, hi):
            song_id = song_ids[i]
            slot = slots.get(song_id)
            if slot is None:
                slot = slots[song_id] = len(slots) + 1
            keys.append(self._event_key(song_id, event_ids[i]))
            args += (slot, types[i], markers[i], weights[i])
        args[2] = len(slots)
        song_keys = [self.song_key(song_id) for song_id in slots]
        tombstones = [self.keys.tombstone(song_id, check=False) for song_id in slots]
        out = self._script(keys=song_keys + tombstones + keys, args=args)
        return out.decode() if isinstance(out, bytes) else str(out)

    def _count_per_song(
        self,
        song_ids: Sequence[str],
        event_ids: Sequence[str],
        types: Sequence[str],
        markers: Sequence[str],
        weights: Sequence[str],
        updated_at: str,
    ) -> str:
        by_song: dict[str, list[int]] = defaultdict(list)
        for i, song_id in enumerate(song_ids):
            by_song[song_id].append(i)
        calls: list[tuple[list[str], list[str | int]]] = []
        for song_id, idx in by_song.items():
            args: list[str | int] = [self.ttl, updated_at, 1, self.orphan_ttl_ms]
            for i in idx:
                args += (1, types[i], markers[i], weights[i])
            keys = [self.song_key(song_id), self.keys.tombstone(song_id, check=False)]
            keys += [self._event_key(song_id, event_ids[i]) for i in idx]
            calls.append((keys, args))
        status = [DUPLICATE] * len(event_ids)
        for idx, out in zip(by_song.values(), run_script_calls(self.client, self._script, calls), strict=True):
            text = out.decode() if isinstance(out, bytes) else str(out)
            for i, st in zip(idx, text, strict=True):
                status[i] = st
        return "".join(status)

    def counts(self, song_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        ids = list(song_ids)
        pipe = self.client.pipeline(transaction=False)
        for song_id in ids:
            pipe.hmget(self.song_key(song_id), [counter_field(c) for c in COUNTERS])
        out: dict[str, dict[str, int]] = {}
        for song_id, values in zip(ids, pipe.execute(), strict=True):
            out[song_id] = {c: int(v or 0) for c, v in zip(COUNTERS, values, strict=True)}
        return out

    def close(self) -> None:
        if "client" in self.__dict__:  # never connected: nothing to close
            self.client.close()
