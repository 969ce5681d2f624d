"""The Redis backends on a real three-master Redis Cluster (``redis+cluster://``, redis-py's
``RedisCluster``; no proxy): where every key lives, the one-slot script paths, SCAN over every
master, the asyncio reads and the change log. The worker, the feedback consumer and the API's
table run on the cluster in tests/test_table_live.py; the counters' statuses in test_feedback.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from indexes import RedisScoreStore, ScoreStore, SongRecord, open_engagement_counters, open_score_store
from indexes.redis_client import cluster_nodes, connect, is_cluster_url
from ranker import stores
from ranker.settings import Settings
from tests.redis_cluster import RedisCluster

#: Enough songs that each of the three masters holds several (checked, so the tests mean something).
SONGS = [f"c-{i:02d}" for i in range(24)]


def song(song_id: str, rank: float) -> SongRecord:
    return SongRecord(
        song_id=song_id,
        model_version="m1",
        scores={"likes": rank},
        rank_score=rank,
        generator="suno",
        created_at="2026-01-01T00:00:00Z",
        scored_at="2026-01-01T00:00:01Z",
        extra={"tags": "lofi"},
    )


@pytest.fixture
def cstore(cluster_settings: Settings) -> Iterator[RedisScoreStore]:
    s: Any = stores.score_store(cluster_settings)
    yield s
    s.close()


def keys_by_node(cluster: RedisCluster, prefix: str) -> dict[int, list[str]]:
    """Every key under ``prefix`` on each master, asked of each node directly (not via the cluster client)."""
    out: dict[int, list[str]] = {}
    for port in cluster.ports:
        node = redis.Redis(host=cluster.host, port=port, decode_responses=True)
        try:
            out[port] = sorted(node.scan_iter(match=f"{prefix}:*", count=1000))
        finally:
            node.close()
    return out


def tag_of(key: str) -> str:
    """The hash tag of ``key`` (what its slot is computed from); the whole key if it has none."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


def test_the_url_scheme_picks_the_cluster_client() -> None:
    first, nodes = cluster_nodes("redis+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001,host-c/?ssl_cert_reqs=none")
    assert first == "redis://u:p%40ss@10.0.0.1:7000/?ssl_cert_reqs=none"
    assert nodes == [("10.0.0.1", 7000), ("::1", 7001), ("host-c", 6379)]
    assert cluster_nodes("rediss+cluster://h:1")[0] == "rediss://h:1"
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1/0")
    for bad, says in (
        ("redis+cluster://", "no node"),
        ("redis+cluster://h:1/2", "database 0"),
        ("redis+cluster://h:x", "port"),
    ):
        with pytest.raises(ValueError, match=says) as caught:
            cluster_nodes(bad)
        assert "p%40ss" not in str(caught.value)
    # A store on an unreachable cluster is built (it connects on first use) and says it is down.
    down = open_score_store("redis+cluster://127.0.0.1:1", "p", 0.5)
    assert isinstance(down, RedisScoreStore) and down.cluster and not down.ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        down.get_song("a")
    down.close()
    counters = open_engagement_counters("redis+cluster://127.0.0.1:1", "p", 60, socket_timeout_s=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):  # retried by the consumer, never a crash at start
        counters.count(["a"], ["e"], ["play"], ["1"], "t")
    counters.close()


def test_every_key_sits_in_its_song_or_feed_slot_across_all_masters(
    cluster_settings: Settings, cstore: RedisScoreStore, redis_cluster: RedisCluster
) -> None:
    """The layout's hash tags, checked where the cluster put each key: a key that lost its tag, or a
    call whose keys span slots, fails here (the cluster client refuses a multi-slot script)."""
    prefix = cluster_settings.redis.key_prefix
    cstore.write_songs([song(s, i / 10) for i, s in enumerate(SONGS)], "cold-start")
    cstore.write_feed_entries([], {"aged": {s: 1.0 for s in SONGS[:4]}}, ages={"aged": {s: 5.0 for s in SONGS[:4]}})
    cstore.replace_feed("rebuilt", {s: float(i) for i, s in enumerate(SONGS[:6])}, ages={s: 9.0 for s in SONGS[:6]})
    counters = stores.engagement_counters(cluster_settings)
    try:
        n = len(SONGS)
        status = counters.count(SONGS, [f"e{i}" for i in range(n)], ["play"] * n, [f"0:{i}" for i in range(n)], "t")
        assert status == "n" * n
    finally:
        counters.close()
    assert cstore.claim_calibration({s: 0.1 for s in SONGS}) == pytest.approx((0.0, n * 0.1))

    by_node = keys_by_node(redis_cluster, prefix)
    every = sorted(k for keys in by_node.values() for k in keys)
    songs_on = {port: [k for k in keys if ":song:" in k] for port, keys in by_node.items()}
    assert all(len(keys) >= 3 for keys in songs_on.values()), songs_on  # spread over all three masters
    assert sum(map(len, songs_on.values())) == n
    names = set(SONGS) | {"cold-start", "aged", "rebuilt"}
    for key in every:
        if key in (cstore.keys.changes(), cstore.keys.calibration()):
            continue  # one key each: any slot
        assert tag_of(key) in names, key  # the tag is a song id or a feed name, nothing wider
        assert key_slot(key.encode()) == key_slot(tag_of(key).encode()), key
    evt = [k for k in every if ":evt:" in k]
    assert len(evt) == n and all(key_slot(k.encode()) == key_slot(cstore.song_key(tag_of(k)).encode()) for k in evt)
    assert not [k for k in every if k.endswith(":rebuild")]  # renamed over the feeds
    assert cstore.feed_page("rebuilt", 0, 2) == [(SONGS[5], 5.0), (SONGS[4], 4.0)]
    # SCAN visits every master: every song found, wherever it lives.
    assert sorted(cstore.scan_song_ids(batch=5)) == SONGS


def test_store_paths_on_the_cluster(cstore: RedisScoreStore) -> None:
    """Writes, reads, feeds, calibration (per-song scripts, reloaded after a SCRIPT FLUSH), trim, replace."""
    assert cstore.cluster and not cstore.multi_key_scripts  # the per-song paths, chosen up front
    cstore.write_songs([song(s, i / 10) for i, s in enumerate(SONGS)], "f")
    assert cstore.ping()
    assert cstore.get_song(SONGS[3]) is not None and cstore.get_song("absent") is None
    got = cstore.get_songs([SONGS[0], "absent", SONGS[1]])
    assert got[1] is None and got[0] is not None and got[0]["rank_score"] == "0.0"
    assert cstore.feed_size("f") == len(SONGS)
    assert cstore.feed_page("f", 0, 2) == [(SONGS[-1], 2.3), (SONGS[-2], 2.2)]
    assert cstore.feed_window("f", 0.25, 2) == [(SONGS[2], 0.2), (SONGS[1], 0.1)]
    fields = cstore.read_fields([SONGS[5], "absent", SONGS[7]], ["rank_score", "tags", "nope"])
    assert fields == [["0.5", "lofi", None], [None, None, None], ["0.7", "lofi", None]]
    parsed = cstore.read_songs([SONGS[2], "absent"])
    assert parsed[0] is not None and parsed[0].scores == {"likes": 0.2} and parsed[1] is None

    for i, sid in enumerate(SONGS[:6]):
        cstore.client.hset(cstore.song_key(sid), mapping={"eng.plays": 10 * (i + 1), "eng.likes": i})
    cstore.client.script_flush()  # every master forgets the scripts: the pipelined calls must reload them
    priors = {sid: 0.1 for sid in SONGS[:6]}
    expected = (sum(range(6)), 0.1 * 10 * sum(range(1, 7)))
    assert cstore.claim_calibration(priors) == pytest.approx(expected)
    assert cstore.claim_calibration(priors) == pytest.approx(expected)  # claimed once only
    assert cstore.calibration_totals() == pytest.approx(expected)

    cstore.write_feed_entries([], {"aged": {"old": 1.0, "new": 2.0}}, ages={"aged": {"old": 10.0, "new": 99.0}})
    assert cstore.trim_feed("aged", created_before=50.0) == 1
    assert cstore.feed_page("aged", 0, 5) == [("new", 2.0)]
    cstore.replace_feed("aged", {"x": 3.0}, ages={"x": 1.0})
    assert cstore.feed_page("aged", 0, 5) == [("x", 3.0)]
    cstore.replace_feed("aged", {}, ages={})
    assert cstore.feed_size("aged") == 0


def test_async_reads_and_the_change_log_on_the_cluster(cstore: RedisScoreStore) -> None:
    """The API's read path: SCAN of every master, ZSCAN, per-song HMGET pipelines, the change log."""
    cstore.write_songs([song(s, i / 10) for i, s in enumerate(SONGS)], "f")

    async def run() -> None:
        reads = cstore.async_reads()
        try:
            assert await reads.ping()
            ids = [sid async for batch in reads.scan_song_ids(batch=7) for sid in batch]
            assert sorted(ids) == SONGS
            pairs = [p async for batch in reads.scan_feed("f", batch=5) for p in batch]
            assert sorted(pairs) == sorted((s, i / 10) for i, s in enumerate(SONGS))
            assert await reads.read_fields([SONGS[1], "absent"], ["rank_score"]) == [["0.1"], [None]]
            assert await reads.feed_window("f", None, 1) == [(SONGS[-1], 2.3)]
            assert await reads.feed_size("f") == len(SONGS)
            assert (await reads.get_song(SONGS[0]) or {}).get("tags") == "lofi"
            assert await reads.feed_scores(["f", "g"], [SONGS[2], "absent"]) == {"f": [0.2, None], "g": [None, None]}
            assert await reads.calibration_totals() == (0.0, 0.0)
            mark = await reads.change_position()
            assert mark != "0-0" and not await reads.changes_lost(mark)
            cstore.write_songs([song("later", 9.0)], "f")
            changes = await reads.read_changes(mark, 10, 0.5)
            assert [c.song_ids for c in changes] == [("later",)]
        finally:
            await reads.close()

    asyncio.run(run())


def test_the_one_call_scripts_are_never_sent_to_the_cluster(cluster_settings: Settings) -> None:
    """Forced onto the one-node path, a batch over several songs is refused by the cluster client
    (its keys span slots): the per-song paths the cluster URL picks are what keeps it working."""
    url = cluster_settings.redis.url.get_secret_value()
    store: Any = open_score_store(url, key_prefix=cluster_settings.redis.key_prefix)
    counters: Any = open_engagement_counters(url, cluster_settings.redis.key_prefix, 60)
    try:
        assert counters.per_song and not store.multi_key_scripts
        store.multi_key_scripts, counters.per_song = True, False
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
            store.read_fields(SONGS[:8], ["rank_score"])
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
            counters.count(SONGS[:8], [f"e{i}" for i in range(8)], ["play"] * 8, ["0:1"] * 8, "t")
    finally:
        store.close()
        counters.close()


def test_the_factory_serves_both_kinds(settings: Settings, cluster_settings: Settings) -> None:
    one: ScoreStore = stores.score_store(settings)
    many: ScoreStore = stores.score_store(cluster_settings)
    try:
        assert isinstance(one, RedisScoreStore) and not one.cluster and one.multi_key_scripts
        assert isinstance(many, RedisScoreStore) and many.cluster and many.ping()
    finally:
        one.close()
        many.close()


def test_a_cluster_that_stops_answering_is_an_infrastructure_error(tmp_path: Path) -> None:
    """What the consumers retry (``INFRA_ERRORS``), not a failure of the batch: a connected cluster client
    whose nodes all stopped raises RedisClusterUnreachableError, which is not a ConnectionError."""
    from consumers.loop import INFRA_ERRORS

    cluster = RedisCluster(tmp_path / "private-cluster")
    cluster.start()
    try:
        client = connect(cluster.url, 0.5)
        client.set("k", "v")
        cluster.stop()
        with pytest.raises(Exception) as raised:
            client.get("k")
        assert isinstance(raised.value, INFRA_ERRORS), type(raised.value)
        client.close()
    finally:
        cluster.stop()
