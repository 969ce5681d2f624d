"""Takedown in the Redis score store: tombstones, deletion, and the check that keeps a write
racing a deletion from bringing the song back.

A deletion (:func:`delete_songs`) takes three steps, each safe to repeat:

1. per song, one script call in the song's slot: set the tombstone ``{prefix}:gone:{<id>}``
   (kept if already there, with its first reason and time; it expires after the store's
   ``tombstone_retention_s``, never by default), read the song's calibration claims and
   delete its hash (scores, counters, claims);
2. one pipelined round trip: remove the song from every feed named and their age indexes,
   and take its claimed likes and expected likes off the calibration totals;
3. log the ids in the change log, so the API's song tables drop them.

The engagement dedup keys ``{prefix}:evt:{<id>}:*`` are left to expire (within the dedup
window): finding them would take a SCAN of the whole keyspace, and the tombstone already makes
every event for the song a no-op. A crash between steps 1 and 2 leaves the song's feed entries
(removed by the retry) and its calibration share (lost: step 1 deleted the claims; the totals
then run a little high).

Writes racing a deletion (:func:`write_unless_tombstoned`): write, then check the tombstones,
then undo the writes of tombstoned songs. A deletion sets the tombstone before it removes
anything, so either the check sees the tombstone, or the deletion's removals come after the
write. On one node the check is one ``EXISTS`` of the batch's tombstones at the end of the
write's own pipeline (the server runs a pipeline in order): no extra round trip. On Redis
Cluster a pipeline's commands for different nodes run in no set order, so the check is a round
trip of its own, after the write. (A per-song script that checks the tombstone before writing
would still need a check after the feed's ZADD, which lives in another slot.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis.exceptions

from indexes.base import Deletion
from indexes.redis_client import cross_slot, run_script_calls
from indexes.redis_schema import CALIBRATION_FIELDS, TOMBSTONE_AT, TOMBSTONE_REASON, check_name, lua

if TYPE_CHECKING:
    from redis.client import Pipeline
    from redis.cluster import ClusterPipeline

    from indexes.redis_store import RedisScoreStore

#: Longest reason a tombstone keeps (characters); longer ones are cut.
MAX_REASON = 256

# KEYS[1] = the song hash, KEYS[2] = its tombstone; ARGV[1] = the tombstone's value, ARGV[2] = its
# TTL in seconds (0: none). Returns {had a hash (0/1), was already tombstoned (0/1), claimed likes,
# claimed expected likes}.
_DELETE_SONG = lua(
    """
local had = redis.call('EXISTS', KEYS[1])
local v = redis.call('HMGET', KEYS[1], '$claimed_likes', '$claimed_expected')
local already = redis.call('EXISTS', KEYS[2])
if already == 0 then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[2], ARGV[1])
  end
end
redis.call('DEL', KEYS[1])
return {had, already, v[1] or '0', v[2] or '0'}
"""
)


def tombstone_value(reason: str, deleted_at: datetime | None = None) -> str:
    """What a tombstone holds: the reason and the time, as JSON."""
    at = (deleted_at or datetime.now(UTC)).isoformat()
    return json.dumps({TOMBSTONE_REASON: reason[:MAX_REASON], TOMBSTONE_AT: at}, separators=(",", ":"))


def delete_songs(store: RedisScoreStore, song_ids: Sequence[str], reason: str, feeds: Sequence[str]) -> list[Deletion]:
    """:meth:`indexes.base.ScoreStore.delete_songs` on Redis (see the module docstring)."""
    ids = list(dict.fromkeys(check_name("song id", s) for s in song_ids))
    feed_names = list(dict.fromkeys(feeds))
    feed_keys = [(store.feed_key(f), store.age_key(f)) for f in feed_names]  # validates the names first
    if not ids:
        return []
    keys = store.keys
    value = tombstone_value(reason)
    ttl = int(store.config.tombstone_retention_s or 0)
    calls = [([keys.song(s, check=False), keys.tombstone(s, check=False)], [value, ttl]) for s in ids]
    out = run_script_calls(store.client, store.client.register_script(_DELETE_SONG), calls)
    d_likes = sum(float(row[2]) for row in out)
    d_expected = sum(float(row[3]) for row in out)
    pipe = store.client.pipeline(transaction=False)
    for feed_key, age_key in feed_keys:
        for s in ids:
            pipe.zrem(feed_key, s)
        pipe.zrem(age_key, *ids)
    if d_likes or d_expected:
        for name, delta in zip(CALIBRATION_FIELDS, (d_likes, d_expected), strict=True):
            pipe.hincrbyfloat(store.calibration_key(), name, -delta)
    removed = pipe.execute() if len(pipe) else []
    per_feed = len(ids) + 1
    deletions = []
    for i, (song_id, row) in enumerate(zip(ids, out, strict=True)):
        in_feeds = tuple(f for j, f in enumerate(feed_names) if removed[j * per_feed + i])
        deletions.append(Deletion(song_id, bool(int(row[0])), bool(int(row[1])), in_feeds))
    store._log_changes(ids)
    return deletions


def undo(store: RedisScoreStore, song_ids: Iterable[str], zset_keys: Iterable[str]) -> None:
    """Remove what a write just wrote for tombstoned songs: their hashes and their members of ``zset_keys``."""
    ids = list(song_ids)
    pipe = store.client.pipeline(transaction=False)
    for s in ids:
        pipe.delete(store.keys.song(s, check=False))
    for key in dict.fromkeys(zset_keys):
        pipe.zrem(key, *ids)
    pipe.execute()


def write_unless_tombstoned(
    store: RedisScoreStore, pipe: Pipeline | ClusterPipeline, song_ids: list[str], zset_keys: list[str]
) -> None:
    """Run the write ``pipe`` (which writes ``song_ids``' hashes and members of ``zset_keys``), then
    undo it for the songs with a tombstone.

    On one node the check rides at the end of the pipeline, where the server runs it after the
    writes: one ``EXISTS`` of every tombstone (a count; which songs, only when it is not 0). On a
    cluster, or behind a proxy that refuses multi-slot commands, it is a round trip of its own
    after the writes (a pipeline's commands for different nodes run in no set order).
    """
    gone: set[str] = set()
    if store.multi_key_scripts and song_ids:
        pipe.exists(*(store.keys.tombstone(s, check=False) for s in song_ids))
        replies = pipe.execute(raise_on_error=False)
        for reply in replies[:-1]:
            if isinstance(reply, Exception):
                raise reply
        found = replies[-1]
        if isinstance(found, redis.exceptions.ResponseError) and cross_slot(found):
            store.multi_key_scripts = False
            gone = store.deleted(song_ids)
        elif isinstance(found, Exception):
            raise found
        elif found:
            gone = store.deleted(song_ids)
    else:
        pipe.execute()
        gone = store.deleted(song_ids)
    if gone:
        undo(store, gone, zset_keys)
