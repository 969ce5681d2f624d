"""The storage interfaces, the Redis schema and the one factory (ranker.stores), against the session's Redis."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexes import (
    AsyncScoreReads,
    EmbeddingStore,
    EngagementCounters,
    RedisScoreStore,
    ScoreStore,
    SegmentStore,
    SegmentStoreError,
    SongRecord,
    SqliteEmbeddingStore,
    StoredSong,
    open_engagement_counters,
    open_score_store,
)
from indexes.index_reader import IndexReader
from indexes.redis_schema import (
    PRIOR_FIELD,
    STATE_FIELDS,
    RedisKeys,
    hydration_fields,
    parse_song,
    score_field,
    song_fields,
)
from ranker import stores
from ranker.events import TASKS
from ranker.features import FeatureStoreError, _segment_store
from ranker.serving.state import READ_FIELDS, WRITE_FIELDS, state_from_fields
from ranker.settings import Settings


def record(song_id: str, **extra: object) -> SongRecord:
    return SongRecord(
        song_id=song_id,
        model_version="m-1",
        scores={t: 1.0 + i for i, t in enumerate(TASKS)},
        rank_score=0.5,
        generator="suno-v4",
        created_at="2025-01-02T03:04:05+00:00",
        scored_at="2025-01-02T03:04:09+00:00",
        extra=dict(extra),
    )


# -- the schema -------------------------------------------------------------------------------------
def test_keys_are_hash_tagged_and_names_checked() -> None:
    keys = RedisKeys("p")
    assert keys.song("a.1") == "p:song:{a.1}" and keys.song_id_of(keys.song("a.1")) == "a.1"
    assert keys.feed("all") == "p:feed:{all}" and keys.feed_age("all") == "p:feedage:{all}"
    assert keys.calibration() == "p:calibration" and keys.event("a.1", "e-9") == "p:evt:{a.1}:e-9"
    assert keys.song_id_of("p:feed:{all}") is None and keys.song_id_of("p:song:x") is None
    with pytest.raises(ValueError, match="hash tag"):
        keys.song("has{brace}")
    with pytest.raises(ValueError, match="hash tag"):
        keys.feed("bad feed")
    assert keys.song("x y", check=False) == "p:song:{x y}"


def test_ranker_fields_are_the_schemas() -> None:
    """The feed read path unpacks READ_FIELDS positionally: scores of TASKS, then STATE_FIELDS."""
    assert READ_FIELDS == hydration_fields(TASKS) == (*(score_field(t) for t in TASKS), *STATE_FIELDS)
    assert WRITE_FIELDS[: len(READ_FIELDS)] == READ_FIELDS
    fields = song_fields(record("s", **{PRIOR_FIELD: 0.2, "tags": ["lofi"], "duration_s": 30.0}))
    state = state_from_fields("s", [fields.get(f) for f in WRITE_FIELDS])
    assert state is not None and state.scores == record("s").scores
    assert state.model_rate == 0.2 and state.generator == "suno-v4" and state.tags == ("lofi",)


def test_parse_song_types_what_callers_read() -> None:
    fields = song_fields(record("s", truncated=True, **{PRIOR_FIELD: 0.25}))
    song = parse_song("s", {**fields, "eng.plays": "7", "eng.likes": "2", "score.extra_task": "x"})
    assert isinstance(song, StoredSong)
    assert song.model_version == "m-1" and song.rank_score == 0.5 and song.generator == "suno-v4"
    assert song.scores == record("s").scores  # an unreadable score is left out
    assert song.created_at == "2025-01-02T03:04:05+00:00" and song.scored_at == "2025-01-02T03:04:09+00:00"
    assert song.truncated and song.prior_like_rate == 0.25
    assert song.counters == {"plays": 7, "likes": 2, "skips": 0, "completes": 0, "shares": 0}
    assert song.fields["truncated"] == "true"
    damaged = parse_song("s", {"rank_score": "nope", "eng.plays": "inf"})
    assert damaged is not None and damaged.rank_score is None and damaged.counters["plays"] == 0
    assert damaged.model_version is None and not damaged.truncated and damaged.scores == {}
    assert parse_song("s", {}) is None and parse_song("s", {"generator": None}) is None


# -- the interfaces ---------------------------------------------------------------------------------
_CALLED = {
    "write_songs",
    "write_feed_entries",
    "claim_calibration",
    "calibration_totals",
    "generator_calibration",
    "set_generator_calibration",
    "trim_feed",
    "replace_feed",
    "scan_song_ids",
    "read_fields",
    "read_songs",
    "feed_window",
    "feed_page",
    "feed_size",
    "get_song",
    "get_songs",
    "async_reads",
    "ping",
    "close",
    "namespace",
    "delete_songs",
    "deleted",
    "expire_songs",
    "expired",
}


def test_the_interfaces_are_what_callers_use() -> None:
    assert not _CALLED - set(dir(ScoreStore))
    assert not inspect.isabstract(RedisScoreStore) and issubclass(RedisScoreStore, ScoreStore)
    async_reads = {"feed_window", "read_fields", "get_song", "feed_size", "calibration_totals", "ping", "close"}
    async_reads.add("generator_calibration")
    assert async_reads <= AsyncScoreReads.__abstractmethods__
    assert {"count", "counts", "close"} <= EngagementCounters.__abstractmethods__
    # What retention and the index catch-up call on the embedding store.
    retention = {"older_than", "prune_deletions", "deletions_pruned_through", "delete", "iter_changes_since"}
    assert retention <= EmbeddingStore.__abstractmethods__
    assert not inspect.isabstract(SqliteEmbeddingStore) and issubclass(SqliteEmbeddingStore, EmbeddingStore)


def test_read_songs_in_one_round_trip(redis_store: ScoreStore) -> None:
    store: Any = redis_store  # one node, then Redis Cluster
    store.write_songs([record("a", **{PRIOR_FIELD: 0.1}), record("b")], "f")
    store.client.hset(store.song_key("played"), mapping={"eng.plays": 3})  # engagement before scores
    full = store.read_songs(["a", "absent", "played"])
    assert full[0] is not None and full[0].scores == record("a").scores and full[0].prior_like_rate == 0.1
    assert full[1] is None
    assert full[2] is not None and full[2].counters["plays"] == 3 and full[2].model_version is None
    meta = store.read_songs(["b", "absent", "played"], fields=["generator", "created_at"])
    assert meta[0] == StoredSong(
        "b",
        generator="suno-v4",
        created_at="2025-01-02T03:04:05+00:00",
        counters=dict.fromkeys(("plays", "likes", "skips", "completes", "shares"), 0),
        fields={"generator": "suno-v4", "created_at": "2025-01-02T03:04:05+00:00"},
    )
    assert meta[1:] == [None, None]  # "played" has neither field
    assert store.read_songs([]) == [] and store.read_songs([], fields=["generator"]) == []


def test_async_reads_match_the_sync_ones(redis_store: ScoreStore) -> None:
    store: Any = redis_store  # one node, then Redis Cluster
    store.write_songs([record("a"), record("b")], "f")

    async def read() -> tuple[object, ...]:
        reads = store.async_reads()
        try:
            # The backend's async reads class, as the store hands it out (never imported by name).
            reads_type = type(reads)
            assert not inspect.isabstract(reads_type) and issubclass(reads_type, AsyncScoreReads)
            return (
                await reads.feed_window("f", None, 10),
                await reads.read_fields(["a", "b"], ["generator"]),
                await reads.get_song("a"),
                await reads.feed_size("f"),
            )
        finally:
            await reads.close()

    assert asyncio.run(read()) == (
        store.feed_window("f", None, 10),
        store.read_fields(["a", "b"], ["generator"]),
        store.get_song("a"),
        store.feed_size("f"),
    )


# -- the factory ------------------------------------------------------------------------------------
def test_ranker_stores_builds_every_store_from_settings(settings: Settings) -> None:
    score = stores.score_store(settings)
    try:
        assert isinstance(score, ScoreStore) and score.namespace == settings.redis.key_prefix and score.ping()
    finally:
        score.close()
    counters = stores.engagement_counters(settings)
    try:
        assert isinstance(counters, EngagementCounters)
        assert counters.count(["s", "s"], ["e1", "e1"], ["play", "play"], ["1", "2"], "2025-01-01T00:00:00Z") == "nd"
        assert counters.counts(["s"])["s"]["plays"] == 1
    finally:
        counters.close()
    index = stores.embedding_index(settings, 8)
    try:
        assert index.config.dim == 8 and index.directory == settings.index_dir
        index.add([])
    finally:
        index.close()
    reader = stores.index_reader(settings)
    try:
        assert isinstance(reader, IndexReader) and reader.load().ready
    finally:
        reader.close()


def test_backends_refuse_unknown_options_and_schemes(settings: Settings) -> None:
    url = settings.redis.url.get_secret_value()
    with pytest.raises(ValueError, match="no_such_option"):
        open_score_store(url, "p", 1.0, no_such_option=1)
    with pytest.raises(ValueError, match=r"unsupported engagement counters URL scheme memcached://"):
        open_engagement_counters("memcached://127.0.0.1:1", "p", 60)
    with pytest.raises(ValueError):
        open_engagement_counters(url, "p", 0)  # a dedup window must be positive


# -- the segment store ------------------------------------------------------------------------------
def test_segment_store_of_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "segments.sqlite"
    with SegmentStore(path) as seg:
        seg.put("enc", [("s", np.zeros((2, 3, 4), np.float32), np.array([5, 6]))])
        features, frames = seg.get_many(["s", "absent"])["s"]
        assert features.shape == (2, 3, 4) and frames.tolist() == [5, 6]
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value='2' WHERE name='schema_version'")
    raw.close()
    with pytest.raises(SegmentStoreError, match="schema 2"):
        SegmentStore(path)
    with pytest.raises(FeatureStoreError, match="schema 2"):
        _segment_store(path)
