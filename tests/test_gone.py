"""ScoreStore.gone (issue 15): which songs were taken down and which expired, asked together in one
round trip before a replayed event is scored. On one Redis node and on the real Redis Cluster."""

from __future__ import annotations

from indexes import RedisScoreStore, ScoreStore, SongRecord
from indexes.base import Gone
from indexes.redis_tombstones import tombstone_value

FEED = "gone-feed"
T0 = 1_780_000_000.0


def song(song_id: str) -> SongRecord:
    at = "2026-06-01T00:00:00+00:00"
    return SongRecord(song_id, "test-1", {"likes": 50.0}, 0.5, "suno-v5", at, at, extra={"prior.like_rate": 0.05})


def test_gone_tells_deleted_from_expired_in_one_call(redis_store: ScoreStore) -> None:
    store = redis_store  # one node, then Redis Cluster: the ids below hash to different slots
    store.write_songs([song(s) for s in ("del.1", "exp.1", "both.1", "live.1")], FEED)
    store.delete_songs(["del.1"], "rights claim", [FEED])
    assert store.expire_songs(["exp.1", "both.1"], [FEED], expired_at=T0) == 2
    # Taken down after it expired: the shrunk hash and a tombstone side by side. delete_songs would
    # delete the hash, so the tombstone is set as step 1 of a deletion sets it.
    assert isinstance(store, RedisScoreStore)
    store.client.set(store.keys.tombstone("both.1"), tombstone_value("abuse"))

    asked = ["del.1", "exp.1", "del.1", "both.1", "live.1", "never.1", "exp.1", "both.1", "never.1"]
    gone = store.gone(asked)
    assert gone == Gone(deleted=frozenset({"del.1", "both.1"}), expired=frozenset({"exp.1"}))
    assert [s for s in dict.fromkeys(asked) if s in gone] == ["del.1", "exp.1", "both.1"]

    # The one-question methods ask the same store alone: expired() looks at the hash only.
    assert store.deleted(asked) == {"del.1", "both.1"}
    assert store.expired(asked) == {"exp.1", "both.1"}
    assert store.gone([]) == Gone() and store.gone(["live.1", "never.1"]) == Gone()
