"""Per-song engagement counters in Redis, with event-id deduplication in the same atomic step.

Counters are fields of the song's hash (``eng.plays``, ``eng.likes``, ...), so a
song that has not been scored yet still keeps its engagement (the hash exists
before its scores do). Deduplication keys share the song's hash tag, so one Lua
call per song touches a single cluster slot: for each event it sets
``{prefix}:evt:{<song_id>}:<event_id>`` with NX and a TTL and, only if that key
was new, increments the counter. A replayed batch therefore counts nothing twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import redis

#: Event type -> (hash field, delta).
COUNTER_FIELDS: dict[str, tuple[str, int]] = {
    "play": ("eng.plays", 1),
    "complete": ("eng.completes", 1),
    "like": ("eng.likes", 1),
    "unlike": ("eng.likes", -1),
    "skip": ("eng.skips", 1),
    "share": ("eng.shares", 1),
}
COUNTERS = ("plays", "completes", "likes", "skips", "shares")

# KEYS[1] = song hash; KEYS[2..n+1] = dedup keys. ARGV[1] = ttl, then (field, delta) per event.
_SCRIPT = """
local ttl = tonumber(ARGV[1])
local accepted = {}
for i = 2, #KEYS do
  local field = ARGV[2 * (i - 1)]
  local delta = tonumber(ARGV[2 * (i - 1) + 1])
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local v = redis.call('HINCRBY', KEYS[1], field, delta)
    if v < 0 then redis.call('HSET', KEYS[1], field, 0) end
    accepted[#accepted + 1] = i - 1
  end
end
redis.call('HSET', KEYS[1], 'eng.updated', ARGV[#ARGV])
return accepted
"""


@dataclass(frozen=True)
class CountedEvent:
    event_id: str
    song_id: str
    type: str


class RedisEngagementCounters:
    """Atomic, deduplicated counter updates; keys compatible with the score store's layout."""

    def __init__(self, client: redis.Redis, key_prefix: str, dedup_window_s: int) -> None:
        self.client = client
        self.prefix = key_prefix
        self.ttl = int(dedup_window_s)
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def from_url(
        cls, url: str, key_prefix: str, dedup_window_s: int, socket_timeout_s: float = 5.0
    ) -> RedisEngagementCounters:
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s)
        return cls(client, key_prefix, dedup_window_s)

    def song_key(self, song_id: str) -> str:
        return f"{self.prefix}:song:{{{song_id}}}"

    def _event_key(self, song_id: str, event_id: str) -> str:
        return f"{self.prefix}:evt:{{{song_id}}}:{event_id}"

    def seen(self, events: Sequence[CountedEvent]) -> set[tuple[str, str]]:
        """(song_id, event_id) pairs already counted within the window (read-only).

        One MGET per song: its dedup keys share the song's hash tag, hence one cluster slot.
        """
        by_song: dict[str, list[str]] = defaultdict(list)
        for e in events:
            by_song[e.song_id].append(e.event_id)
        pipe = self.client.pipeline(transaction=False)
        order = list(by_song)
        for song_id in order:
            pipe.mget([self._event_key(song_id, event_id) for event_id in by_song[song_id]])
        out: set[tuple[str, str]] = set()
        for song_id, values in zip(order, pipe.execute(), strict=True):
            out.update((song_id, ev) for ev, v in zip(by_song[song_id], values, strict=True) if v is not None)
        return out

    def apply(self, events: Sequence[CountedEvent], updated_at: str) -> list[CountedEvent]:
        """Count the events not seen within the window; returns those accepted (in input order)."""
        by_song: dict[str, list[CountedEvent]] = defaultdict(list)
        unique: dict[tuple[str, str], CountedEvent] = {}
        for e in events:
            if (e.song_id, e.event_id) not in unique:  # a repeat inside the batch is a duplicate too
                unique[(e.song_id, e.event_id)] = e
                by_song[e.song_id].append(e)
        pipe = self.client.pipeline(transaction=False)
        order = list(by_song)
        for song_id in order:
            group = by_song[song_id]
            keys = [self.song_key(song_id)] + [self._event_key(song_id, e.event_id) for e in group]
            args: list[str | int] = [self.ttl]
            for e in group:
                field, delta = COUNTER_FIELDS[e.type]
                args += [field, delta]
            args.append(updated_at)
            self._script(keys=keys, args=args, client=pipe)
        results = pipe.execute()
        accepted_ids: set[tuple[str, str]] = set()
        for song_id, idx in zip(order, results, strict=True):
            group = by_song[song_id]
            accepted_ids.update((song_id, group[int(i) - 1].event_id) for i in idx)
        return [e for k, e in unique.items() if k in accepted_ids]

    def counts(self, song_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        ids = list(song_ids)
        pipe = self.client.pipeline(transaction=False)
        for song_id in ids:
            pipe.hmget(self.song_key(song_id), [f"eng.{c}" for c in COUNTERS])
        out: dict[str, dict[str, int]] = {}
        for song_id, values in zip(ids, pipe.execute(), strict=True):
            out[song_id] = {c: int(v or 0) for c, v in zip(COUNTERS, values, strict=True)}
        return out

    def close(self) -> None:
        self.client.close()


def counter_deltas(events: Iterable[CountedEvent]) -> Mapping[str, dict[str, int]]:
    """Expected per-song counter changes of a set of events (for tests and reports)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    for e in events:
        field, delta = COUNTER_FIELDS[e.type]
        out[e.song_id][field.removeprefix("eng.")] += delta
    return out
