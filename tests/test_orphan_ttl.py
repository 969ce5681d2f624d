"""Engagement for a song with no record starts a hash that expires (feedback.orphan_ttl_s) unless the song
is scored meanwhile: late events for long-gone songs cannot grow Redis without bound. Node and Cluster."""

from __future__ import annotations

from indexes import RedisScoreStore, SongRecord, message_marker
from ranker import stores
from ranker.settings import Settings

FEED = "orphan-feed"


def song(song_id: str) -> SongRecord:
    at = "2026-06-01T00:00:00+00:00"
    return SongRecord(song_id, "test-1", {"likes": 50.0}, 0.5, "suno-v5", at, at, extra={"prior.like_rate": 0.05})


def test_a_counters_only_hash_expires_unless_the_song_is_scored(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(
        update={"feedback": redis_settings.feedback.model_copy(update={"orphan_ttl_s": 600})}
    )
    store = stores.score_store(settings)
    counters = stores.engagement_counters(settings)
    try:
        assert isinstance(store, RedisScoreStore)
        store.write_songs([song("scored.1")], FEED)
        ids = ["scored.1", "early.1", "late.1", "early.1"]
        status = counters.count(
            ids,
            ["e1", "e2", "e3", "e4"],
            ["play", "play", "like", "like"],
            [message_marker(0, i) for i in range(4)],
            "2026-06-02T00:00:00+00:00",
        )
        assert status == "nnnn"
        ttl = {s: store.client.pttl(store.song_key(s)) for s in ("scored.1", "early.1", "late.1")}
        assert ttl["scored.1"] == -1, ttl  # a song's record never expires by engagement
        assert 0 < ttl["early.1"] <= 600_000 and 0 < ttl["late.1"] <= 600_000, ttl
        assert counters.counts(["early.1"])["early.1"]["likes"] == 1  # the counts are kept meanwhile

        store.write_songs([song("early.1")], FEED)  # scored after its first plays: a record for good
        assert store.client.pttl(store.song_key("early.1")) == -1
        assert counters.counts(["early.1"])["early.1"]["plays"] == 1  # and its early engagement with it
        counters.count(["early.1"], ["e5"], ["play"], [message_marker(0, 5)], "2026-06-02T00:00:00+00:00")
        assert store.client.pttl(store.song_key("early.1")) == -1  # later events do not bring a TTL back
    finally:
        counters.close()
        store.close()


def test_without_an_orphan_ttl_nothing_expires(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(
        update={"feedback": redis_settings.feedback.model_copy(update={"orphan_ttl_s": None})}
    )
    store = stores.score_store(settings)
    counters = stores.engagement_counters(settings)
    try:
        assert isinstance(store, RedisScoreStore)
        counters.count(["kept.1"], ["e1"], ["play"], [message_marker(0, 1)], "2026-06-02T00:00:00+00:00")
        assert store.client.pttl(store.song_key("kept.1")) == -1
    finally:
        counters.close()
        store.close()
