"""Listener taste and heard sets in Redis, one Lua script call per user, on one node or Redis Cluster.

Keys are :mod:`indexes.redis_schema`'s, all three hash-tagged by the user: the taste hash
``{prefix}:user:{<user>}``, the heard set ``{prefix}:heard:{<user>}`` and a dedup key per event,
``{prefix}:uevt:{<user>}:<event_id>``. So one script call touches one slot, and the same path
serves a single node and a cluster: the calls of a batch go out pipelined, one round trip (one
per node on a cluster).

The script does the taste arithmetic itself (Lua's ``struct`` packs and unpacks the float32
vector; Redis 6.2's and 7's Lua both have it), because two feedback consumers of a group may
update one user at the same time (a user's events are spread over partitions, which are keyed by
song): inside the script the read, the decay and the write are one atomic step, with no WATCH
retry loop. Only an event whose dedup key is new changes anything, so a replayed or duplicated
event changes neither the taste nor the heard set. Before any write the script reads both keys,
so a key of the wrong type fails the call with nothing written. ``ZADD GT`` needs Redis 6.2.

The counters of the song (:mod:`indexes.redis_engagement`) are a separate step with their own
dedup keys in the song's slot; see :mod:`consumers.feedback` for what a crash between the two
can do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import redis.exceptions
from pydantic import BaseModel, ConfigDict, Field
from redis.client import NEVER_DECODE

from indexes.listeners import (
    AsyncListenerReads,
    Listener,
    ListenerEvent,
    ListenerStateUnavailable,
    ListenerStore,
    ListenerUpdate,
    Taste,
    taste_weight,
)
from indexes.redis_client import (
    UNREACHABLE,
    AsyncClient,
    LazyClient,
    SyncClient,
    connect,
    connect_async,
    run_script_calls,
)
from indexes.redis_schema import TASTE_AT, TASTE_EVIDENCE, TASTE_FIELDS, TASTE_VECTOR, RedisKeys, check_prefix

__all__ = ["RedisListenerConfig", "RedisListenerStore"]

#: What "the listener state cannot be read" raises, as the API's store_down handler counts it.
_DOWN: tuple[type[Exception], ...] = (*UNREACHABLE, redis.exceptions.ClusterDownError)

#: Most events per script call (a user with more in one batch gets several calls, in order).
CHUNK = 1000
#: A taste sum shorter than this has no direction (a like taken back by an unlike).
_MIN_NORM = 1e-6

# KEYS = the user's taste hash, heard set, then one dedup key per event.
# ARGV = dedup ttl, half-life (s), heard cap, heard ttl, taste ttl (0: none), then per event:
# song id, ts (epoch s), weight, evidence change, vector (float32 LE bytes; empty: none or no weight).
# Returns one character per event: n (applied now) or d (seen before).
_SCRIPT = (
    """local dedup_ttl = tonumber(ARGV[1])
local half_life = tonumber(ARGV[2])
local heard_max = tonumber(ARGV[3])
local heard_ttl = tonumber(ARGV[4])
local taste_ttl = tonumber(ARGV[5])
-- float32 LE bytes -> numbers; whole vectors at once, in slices that stay far below Lua's C stack limit
local function floats(s)
  local t, n = {}, #s / 4
  for lo = 1, n, 2000 do
    local k = math.min(2000, n - lo + 1)
    local part = {struct.unpack('<' .. string.rep('f', k), s, 4 * (lo - 1) + 1)}
    for j = 1, k do t[lo + j - 1] = part[j] end
  end
  return t
end
-- Reads first: a key of the wrong type fails here, before anything is written.
local raw = redis.call('HMGET', KEYS[1], '$vec', '$evidence', '$at')
redis.call('ZCARD', KEYS[2])
local vec, dim = nil, 0
if raw[1] then
  dim = #raw[1] / 4
  vec = floats(raw[1])
end
local ev = tonumber(raw[2]) or 0
local at = tonumber(raw[3])
local out = {}
local moved, heard = false, false
local a = 6
for i = 3, #KEYS do
  local song, ts, w, dev, v = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', dedup_ttl) then
    out[#out + 1] = 'n'
    redis.call('ZADD', KEYS[2], 'GT', ts, song)
    heard = true
    if w ~= 0 and #v > 0 then
      local n = #v / 4
      if vec == nil or n ~= dim then  -- a first taste, or a new encoder's dimension: start afresh
        vec, dim, ev, at = {}, n, 0, ts
        for j = 1, n do vec[j] = 0 end
      end
      at = at or ts
      local f = 1
      if ts >= at then  -- decay what is there to this event's time
        local d = 2 ^ (-(ts - at) / half_life)
        for j = 1, dim do vec[j] = vec[j] * d end
        ev, at = ev * d, ts
      else  -- an older event arrives late: decay it to the taste's time
        f = 2 ^ (-(at - ts) / half_life)
      end
      local x, wf = floats(v), w * f
      for j = 1, dim do vec[j] = vec[j] + wf * x[j] end
      ev = ev + dev * f
      if ev < 0 then ev = 0 end
      moved = true
    end
  else
    out[#out + 1] = 'd'
  end
end
if moved then
  local parts = {}
  for lo = 1, dim, 2000 do
    local k = math.min(2000, dim - lo + 1)
    parts[#parts + 1] = struct.pack('<' .. string.rep('f', k), unpack(vec, lo, lo + k - 1))
  end
  redis.call('HSET', KEYS[1], '$vec', table.concat(parts), '$evidence', string.format('%.17g', ev),
    '$at', string.format('%.17g', at))
  if taste_ttl > 0 then redis.call('EXPIRE', KEYS[1], taste_ttl) end
end
if heard then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(heard_max + 1))
  redis.call('EXPIRE', KEYS[2], heard_ttl)
end
return table.concat(out)
""".replace("$vec", TASTE_VECTOR)
    .replace("$evidence", TASTE_EVIDENCE)
    .replace("$at", TASTE_AT)
)


class RedisListenerConfig(BaseModel):
    """Connection, key prefix, dedup window and the taste/heard parameters of :class:`RedisListenerStore`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="redis://, rediss://, unix:// (one node) or redis+cluster://, rediss+cluster://.")
    key_prefix: str = "apexrank"
    dedup_window_s: int = Field(gt=0, description="How long an event id is remembered (as the counters').")
    half_life_s: float = Field(gt=0, description="Event-time half-life of the taste's weights.")
    skip_weight: float = Field(ge=0, description="A skip adds -skip_weight times the song's vector.")
    heard_max: int = Field(ge=1, description="Songs kept per heard set (the newest).")
    heard_ttl_s: int = Field(gt=0, description="A heard set expires this long after its last write.")
    taste_ttl_s: int | None = Field(None, gt=0, description="A taste expires this long after its last change.")
    socket_timeout_s: float = Field(5.0, gt=0)


class RedisListenerStore(ListenerStore):
    """Taste and heard sets of :mod:`indexes.listeners`, stored as the module docstring says."""

    config_type: ClassVar[type[BaseModel]] = RedisListenerConfig

    def __init__(self, client: SyncClient | Callable[[], SyncClient], config: RedisListenerConfig) -> None:
        """``client``: a client, or what makes one on first use (a cluster client connects when made)."""
        self._redis = LazyClient(client)
        self.config = config
        self.keys = RedisKeys(check_prefix(config.key_prefix))

    @classmethod
    def from_config(cls, config: RedisListenerConfig) -> RedisListenerStore:
        """Connects on first use, so the store can be made while Redis is down."""
        return cls(lambda: connect(config.url, config.socket_timeout_s), config)

    @property
    def client(self) -> SyncClient:
        return self._redis.client

    def record(self, events: Sequence[ListenerEvent], vectors: Mapping[str, np.ndarray]) -> ListenerUpdate:
        c = self.config
        head: list[Any] = [c.dedup_window_s, repr(c.half_life_s), c.heard_max, c.heard_ttl_s, c.taste_ttl_s or 0]
        packed: dict[str, bytes] = {}
        by_user: dict[str, list[ListenerEvent]] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e)
        calls: list[tuple[list[str], list[Any]]] = []
        order: list[ListenerEvent] = []
        lacking: set[int] = set()  # positions in ``order`` of weighted events without a vector
        for user, mine in by_user.items():
            for lo in range(0, len(mine), CHUNK):
                keys = [self.keys.user(user), self.keys.heard(user)]
                args = list(head)
                for e in mine[lo : lo + CHUNK]:
                    weight, evidence = taste_weight(e.type, c.skip_weight)
                    blob = b""
                    if weight:
                        blob = packed.get(e.song_id) or self._pack(e.song_id, vectors, packed)
                        if not blob:
                            lacking.add(len(order))
                    keys.append(self.keys.user_event(user, e.event_id))
                    args += [e.song_id, repr(float(e.ts)), repr(weight), repr(evidence), blob]
                    order.append(e)
                calls.append((keys, args))
        if not calls:
            return ListenerUpdate()
        status = "".join(_text(out) for out in run_script_calls(self.client, self._redis.script(_SCRIPT), calls))
        applied = [i for i, st in enumerate(status) if st == "n"]
        missing = sum(1 for i in applied if i in lacking)
        moved = sum(1 for i in applied if i not in lacking and taste_weight(order[i].type, c.skip_weight)[0])
        return ListenerUpdate(
            applied=len(applied), seen=len(status) - len(applied), missing_vectors=missing, taste_updates=moved
        )

    @staticmethod
    def _pack(song_id: str, vectors: Mapping[str, np.ndarray], packed: dict[str, bytes]) -> bytes:
        """The song's vector, unit length, as float32 little-endian bytes; empty when unknown or not finite."""
        vec = vectors.get(song_id)
        blob = b""
        if vec is not None:
            v = np.asarray(vec, dtype=np.float64).ravel()
            norm = float(np.linalg.norm(v))
            if v.size and math.isfinite(norm) and norm > 0:
                blob = (v / norm).astype("<f4").tobytes()
        packed[song_id] = blob
        return blob

    def taste(self, user_ids: Iterable[str], now: float | None = None) -> dict[str, Taste]:
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for user in users:  # raw bytes: the vector is binary, and the client decodes replies by default
            pipe.execute_command("HMGET", self.keys.user(user), *TASTE_FIELDS, **{NEVER_DECODE: []})
        at_now = time.time() if now is None else now
        half_life = self.config.half_life_s
        return {
            user: parse_taste(blob, evidence, at, at_now, half_life)
            for user, (blob, evidence, at) in zip(users, pipe.execute(), strict=True)
        }

    def heard(self, user_id: str, song_ids: Sequence[str]) -> set[str]:
        if not song_ids:
            return set()
        scores = self.client.zmscore(self.keys.heard(user_id), list(song_ids))
        return {s for s, score in zip(song_ids, scores, strict=True) if score is not None}

    def heard_all(self, user_id: str) -> list[str]:
        members = self.client.zrevrange(self.keys.heard(user_id), 0, self.config.heard_max - 1)
        return [_text(m) for m in members]

    def async_reads(self) -> AsyncListenerReads:
        return AsyncRedisListenerReads(self.config, self.keys)

    def close(self) -> None:
        self._redis.close()


class AsyncRedisListenerReads(AsyncListenerReads):
    """A user's taste hash and heard set on ``redis.asyncio``: one pipelined round trip (both keys are
    hash-tagged by the user, so on a cluster they sit on one node)."""

    def __init__(self, config: RedisListenerConfig, keys: RedisKeys) -> None:
        self.config = config
        self.keys = keys
        self._redis: AsyncClient = connect_async(config.url, config.socket_timeout_s)

    async def listener(self, user_id: str, now: float | None = None) -> Listener:
        c = self.config
        pipe = self._redis.pipeline(transaction=False)
        pipe.execute_command("HMGET", self.keys.user(user_id), *TASTE_FIELDS, **{NEVER_DECODE: []})
        pipe.zrevrange(self.keys.heard(user_id), 0, c.heard_max - 1)
        try:
            (blob, evidence, at), heard = await pipe.execute()
        except _DOWN as exc:
            raise ListenerStateUnavailable(f"{type(exc).__name__}: {exc}") from exc
        at_now = time.time() if now is None else now
        songs = tuple(heard) if not heard or isinstance(heard[0], str) else tuple(map(bytes.decode, heard))
        return Listener(parse_taste(blob, evidence, at, at_now, c.half_life_s), songs)

    async def close(self) -> None:
        await self._redis.aclose()


def parse_taste(blob: bytes | None, evidence: bytes | None, at: bytes | None, now: float, half_life_s: float) -> Taste:
    """A taste hash's fields as read (raw bytes), its evidence decayed to ``now``; the sync and async reads share it."""
    if not blob or evidence is None or at is None:
        return Taste(None, 0.0)
    updated = float(at)
    ev = float(evidence) * 2.0 ** (-max(0.0, now - updated) / half_life_s)
    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm < _MIN_NORM:
        return Taste(None, ev, updated)
    return Taste(vec / norm, ev, updated)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
