"""Retention in the Redis score store: a song past the window leaves the hot path but keeps its history.

:func:`expire_songs` takes three steps, each safe to repeat (the same shape as a takedown,
:mod:`indexes.redis_tombstones`):

1. per song, one script call in the song's slot: drop every field of its hash but
   :data:`~indexes.redis_schema.RETAINED_FIELDS` and the ``eng.*`` / ``cal.*`` fields, and set
   ``expired_at`` (the first expiry's time is kept). A song with no hash is left alone (no
   empty hash is made for it). The scores go, so the hash is no rankable song: the feed writer
   skips it when engagement arrives, and the API's table drops its row. Its counters keep counting.
   With ``history_s`` the shrunk hash expires that long after (Redis's own clock; set once, at
   the first expiry): Redis memory is then flat too, and the archive (which copies the
   song's generator, creation time and model) and the engagement log hold the history.
2. one pipelined round trip: remove the songs from every feed named and their age indexes;
3. log the ids in the change log, so the API's song tables drop them.

The calibration claims stay, and so does the songs' share of the calibration totals: their
likes were observed against their priors, which is what the totals measure.

Unlike a tombstone, expiry does not stop later writes: a rescore of an expired song (a
replayed ``songs.generated``) scores it again. Callers that must not do that ask
:meth:`~indexes.base.ScoreStore.gone` first (:mod:`indexes.redis_gone`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from indexes.redis_client import run_script_calls
from indexes.redis_schema import EXPIRED_AT, RETAINED_FIELDS, RETAINED_PREFIXES, check_name

if TYPE_CHECKING:
    from indexes.redis_store import RedisScoreStore

# KEYS[1] = the song hash; ARGV[1] = expired_at, ARGV[2] = the history's TTL in ms (0: none),
# ARGV[3] = how many prefixes follow, then the kept prefixes, then the kept field names.
# Returns 1 if the hash existed (now shrunk), 0 if not.
_EXPIRE_SONG = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
local prefixes, keep = {}, {}
for i = 4, 3 + n do prefixes[#prefixes + 1] = ARGV[i] end
for i = 4 + n, #ARGV do keep[ARGV[i]] = true end
local drop = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local kept = keep[f]
  if not kept then
    for _, p in ipairs(prefixes) do
      if string.sub(f, 1, #p) == p then kept = true break end
    end
  end
  if not kept then drop[#drop + 1] = f end
end
if #drop > 0 then redis.call('HDEL', KEYS[1], unpack(drop)) end
if redis.call('HSETNX', KEYS[1], 'EXPIRED_AT', ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
""".replace("EXPIRED_AT", EXPIRED_AT)


def expire_songs(
    store: RedisScoreStore,
    song_ids: Sequence[str],
    feeds: Sequence[str],
    expired_at: float,
    history_s: float | None = None,
) -> int:
    """:meth:`indexes.base.ScoreStore.expire_songs` on Redis (see the module docstring)."""
    ids = list(dict.fromkeys(check_name("song id", s) for s in song_ids))
    feed_keys = [(store.feed_key(f), store.age_key(f)) for f in dict.fromkeys(feeds)]  # validates the names
    if not ids:
        return 0
    ttl_ms = 0 if history_s is None else max(1, int(history_s * 1000))
    args = [repr(float(expired_at)), ttl_ms, len(RETAINED_PREFIXES), *RETAINED_PREFIXES, *RETAINED_FIELDS, EXPIRED_AT]
    script = store.client.register_script(_EXPIRE_SONG)
    out = run_script_calls(store.client, script, [([store.keys.song(s, check=False)], args) for s in ids])
    unfeed(store, ids, feed_keys)
    store._log_changes(ids)
    return sum(int(x) for x in out)


def unfeed(store: RedisScoreStore, song_ids: Sequence[str], feed_keys: Sequence[tuple[str, str]]) -> None:
    """Remove songs from feeds and their age indexes, in one round trip (one slot per command)."""
    pipe = store.client.pipeline(transaction=False)
    for feed_key, age_key in feed_keys:
        pipe.zrem(feed_key, *song_ids)
        pipe.zrem(age_key, *song_ids)
    if len(pipe):
        pipe.execute()
