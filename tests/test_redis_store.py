"""RedisScoreStore against the session's real Redis (an isolated key prefix per test); the basic reads and
writes also on the real Redis Cluster (``redis_store``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from consumers.stack import free_port
from indexes import RedisScoreStore, RedisStoreConfig, ScoreStore, SongRecord, open_score_store
from indexes.redis_schema import (
    MODEL_OPTIONAL_FIELDS,
    OOD_FLAG,
    PRIOR_FIELD,
    PRIOR_SD_FIELD,
    UNTRAINED,
    song_fields,
)
from ranker.settings import Settings


def song(song_id: str, rank: float, **extra: object) -> SongRecord:
    return SongRecord(
        song_id=song_id,
        model_version="apex-2024.1",
        scores={"streams": 0.25, "likes": rank, "musicality": 3.5},
        rank_score=rank,
        generator="suno-v4",
        created_at="2025-01-02T03:04:05Z",
        scored_at="2025-01-02T03:04:09.5Z",
        extra=dict(extra),
    )


def test_write_then_read_back(redis_store: RedisScoreStore) -> None:
    store = redis_store  # one node, then Redis Cluster
    store.write_songs([song("a.1", 0.5, duration_s=31.5, tags=["lofi"], uri="s3://x/a.1.mp3")], "cold-start")
    got = store.get_song("a.1")
    assert got == {
        "song_id": "a.1",
        "model_version": "apex-2024.1",
        "rank_score": "0.5",
        "generator": "suno-v4",
        "created_at": "2025-01-02T03:04:05Z",
        "scored_at": "2025-01-02T03:04:09.5Z",
        "score.streams": "0.25",
        "score.likes": "0.5",
        "score.musicality": "3.5",
        "duration_s": "31.5",
        "tags": '["lofi"]',
        "uri": "s3://x/a.1.mp3",
    }
    assert store.get_song("absent") is None
    assert store.ping()
    # Many at once (the worker's replay check): one round trip, same records, None where absent.
    store.write_songs([song("b.2", 0.25)], "cold-start")
    assert store.get_songs(["a.1", "absent", "b.2"]) == [got, None, store.get_song("b.2")]
    assert store.get_songs([]) == []


def test_replay_is_idempotent_and_rescoring_moves_not_duplicates(redis_store: RedisScoreStore) -> None:
    store = redis_store  # one node, then Redis Cluster
    batch = [song(f"s-{i}", i / 10) for i in range(5)]
    store.write_songs(batch, "cold-start")
    before = store.get_song("s-3")
    store.write_songs(batch, "cold-start")
    assert store.feed_size("cold-start") == 5 and store.get_song("s-3") == before
    store.write_songs([song("s-0", 0.99)], "cold-start")
    assert store.feed_size("cold-start") == 5
    assert store.feed_page("cold-start", 0, 1) == [("s-0", 0.99)]


def rescored(record: SongRecord, **extra: object) -> SongRecord:
    """``record`` scored again by another model, whose record carries ``extra`` alone."""
    return SongRecord(**{**record.__dict__, "model_version": "apex-2025.2", "extra": extra})


WRITES: dict[str, Callable[[RedisScoreStore, SongRecord], None]] = {
    "write_songs": lambda store, record: store.write_songs([record], "f"),
    "write_feed_entries": lambda store, record: store.write_feed_entries([record], {"f": {record.song_id: 0.5}}),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_rescore_deletes_the_old_models_optional_fields_and_keeps_the_rest(
    redis_store: RedisScoreStore, write: str
) -> None:
    store = redis_store  # one node, then Redis Cluster
    model = {UNTRAINED: 1, OOD_FLAG: 1, "ood.pct": 99.5, PRIOR_FIELD: 0.02, PRIOR_SD_FIELD: 0.05}
    model |= {"spread.likes": 0.1, "spread.retired_task": 0.2}
    worker = {"tags": "lofi,chill", "duration_s": 30.0, "truncated": True, "n_segments": 2}
    old = song("r.1", 0.5, **model, **worker)
    WRITES[write](store, old)
    others = {"eng.plays": "4", "eng.likes": "1", "eng.updated": "1760000000", "cal.likes": "1", "cal.expected": "0.08"}
    store.client.hset(store.song_key("r.1"), mapping=others)
    store.client.expire(store.song_key("r.1"), 600)  # as if the counters had come first (orphan_ttl_s)
    # Another model with a single head, no OOD model and no target transform, which gives one spread.
    new = rescored(old, **{"spread.likes": 0.3})
    WRITES[write](store, new)
    got = store.get_song("r.1")
    assert got is not None and got["model_version"] == "apex-2025.2" and got["spread.likes"] == "0.3"
    assert not set(got) & {*MODEL_OPTIONAL_FIELDS, "spread.retired_task"}
    assert {k: got.get(k) for k in others} == others  # engagement and calibration claims: not the model's
    assert store.client.ttl(store.song_key("r.1")) == -1  # a song's record now: no expiry
    assert {k: got.get(k) for k in worker} == {
        "tags": "lofi,chill",
        "duration_s": "30.0",
        "truncated": "true",
        "n_segments": "2",
    }
    WRITES[write](store, new)  # a replay deletes nothing more
    assert store.get_song("r.1") == got
    WRITES[write](store, old)  # the old record again: every field it carries is written back
    back = store.get_song("r.1")
    assert back is not None and {k: back.get(k) for k in model} == {k: song_fields(old)[k] for k in model}


def test_a_node_without_the_write_script_gets_it(redis_store: RedisScoreStore) -> None:
    """NOSCRIPT (a restarted or failed-over node, SCRIPT FLUSH): the script is loaded and the write sent again."""
    store = redis_store  # one node, then Redis Cluster
    store.write_songs([song("n.1", 0.5, untrained=1)], "f")
    store.client.script_flush()
    store.write_feed_entries([rescored(song("n.1", 0.25))], {"f": {"n.1": 0.25}})
    got = store.get_song("n.1")
    assert got is not None and got["model_version"] == "apex-2025.2" and UNTRAINED not in got
    assert store.feed_page("f", 0, 1) == [("n.1", 0.25)]


def test_feed_is_best_first_and_pages(redis_store: RedisScoreStore) -> None:
    store = redis_store  # one node, then Redis Cluster
    store.write_songs([song(f"s-{i}", r) for i, r in enumerate([0.3, 0.9, 0.1, 0.7])], "f1")
    store.write_songs([song("other", 1.0)], "f2")
    assert store.feed_page("f1", 0, 10) == [("s-1", 0.9), ("s-3", 0.7), ("s-0", 0.3), ("s-2", 0.1)]
    assert store.feed_page("f1", 1, 2) == [("s-3", 0.7), ("s-0", 0.3)]
    assert store.feed_page("f1", 10, 5) == [] and store.feed_page("f1", 0, 0) == []
    assert store.feed_size("f2") == 1 and store.feed_size("never-written") == 0


def test_keys_use_cluster_hash_tags(store: RedisScoreStore, settings: Settings) -> None:
    store.write_songs([song("Song_1:v2-x.y", 0.4)], "cold-start")
    prefix = settings.redis.key_prefix
    assert store.song_key("Song_1:v2-x.y") == f"{prefix}:song:{{Song_1:v2-x.y}}"
    assert store.feed_key("cold-start") == f"{prefix}:feed:{{cold-start}}"
    assert sorted(store.client.keys(f"{prefix}:*")) == [
        f"{prefix}:changes",  # the change log the API's song tables follow (one key, its own slot)
        f"{prefix}:feed:{{cold-start}}",
        f"{prefix}:song:{{Song_1:v2-x.y}}",
    ]
    assert store.client.type(f"{prefix}:song:{{Song_1:v2-x.y}}") == "hash"
    assert store.client.type(f"{prefix}:changes") == "stream"


@pytest.mark.parametrize(
    ("records", "feed", "match"),
    [
        ([song("has{brace}", 0.1)], "f", "hash tag"),
        ([song("ok", 0.1)], "bad feed", "hash tag"),
        ([song("ok", 0.1), song("nan", float("nan"))], "f", "finite"),
        ([song("ok", 0.1), song("clash", 0.2, generator="x")], "f", "reserved"),
        ([song("ok", 0.1), song("obj", 0.2, blob=object())], "f", "not JSON"),
    ],
)
def test_invalid_batches_write_nothing(
    store: RedisScoreStore, settings: Settings, records: list[SongRecord], feed: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        store.write_songs(records, feed)
    assert store.client.keys(f"{settings.redis.key_prefix}:*") == []


def test_open_score_store_by_scheme(settings: Settings) -> None:
    url = settings.redis.url.get_secret_value()
    opened: ScoreStore = open_score_store(url, settings.redis.key_prefix, 2.0)
    assert isinstance(opened, RedisScoreStore) and opened.ping()
    opened.close()
    unix = open_score_store("unix:///tmp/apexrank-no-such.sock", "p", 1.0)  # connects lazily
    assert isinstance(unix, RedisScoreStore) and not unix.ping()
    with pytest.raises(ValueError, match=r"redis://, rediss://, unix://"):
        open_score_store("memcached://127.0.0.1:11211", "p", 1.0)
    with pytest.raises(ValueError):
        RedisStoreConfig(url=url, key_prefix="bad{prefix}")
    with pytest.raises(ValueError):
        RedisStoreConfig(url=url, unknown=1)  # type: ignore[call-arg]


def test_connection_errors_propagate_for_the_worker_to_retry() -> None:
    dead = RedisScoreStore(RedisStoreConfig(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5))
    assert dead.ping() is False
    with pytest.raises(redis.exceptions.ConnectionError):
        dead.write_songs([song("a", 0.1)], "f")
    with pytest.raises(redis.exceptions.ConnectionError):
        dead.get_song("a")
    dead.close()
