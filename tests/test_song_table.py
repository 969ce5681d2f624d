"""The song table and its change log: the feed order is Redis's, the columns are the fields' parse,
every write is logged, and a follower that loses the log reads the store again."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import redis.exceptions
from fastapi.testclient import TestClient

from consumers.stack import EmbeddedStack
from indexes import RedisScoreStore, RedisStoreConfig
from indexes.base import SongRecord
from ranker.events import TASKS
from ranker.serving.api import create_app
from ranker.serving.batch import SongBatch
from ranker.serving.filters import RequestFilters, TagMode
from ranker.serving.policy import parse_tags, tags_match
from ranker.serving.reader import FeedReader, TableNotReady
from ranker.serving.state import TABLE_FIELDS, WRITE_FIELDS
from ranker.serving.table import _NAME_SLACK, _TAG_SLACK, FeedOrder, SongTable
from ranker.serving.table_sync import TableSync
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, Settings
from tests.test_api import DIM, add_vectors
from tests.test_policy import plain, with_feeds
from tests.test_rank_equivalence import NOW, seed_catalog


def record(song_id: str, likes: float = 50.0, generator: str = "suno-v5") -> SongRecord:
    scores = {t: (likes if t in ("likes", "streams") else 3.0) for t in TASKS}
    return SongRecord(song_id, "m1", scores, 0.5, generator, "2025-10-09T08:00:00+00:00", "2025-10-09T08:00:00+00:00")


# -- the feed order ---------------------------------------------------------------------------------
def test_feed_order_windows_are_redis_ranges(store: RedisScoreStore) -> None:
    """``window`` answers what ZRANGE BYSCORE REV LIMIT answers, ties and infinities included."""
    rng = random.Random(2)
    scores = [0.0, -0.0, 1.5, -3.25, 1e300, -1e300, 7.0, 7.0, 7.0]
    members = {f"{rng.choice('abcxyz')}{i:03d}": rng.choice(scores) for i in range(300)}
    key = store.feed_key("f")
    store.client.zadd(key, members)
    order = FeedOrder(members.items())
    for max_score in [None, *scores, 2.0, -1e301, float("-inf")]:
        for count in (1, 5, 40, 400):
            want = store.feed_window("f", max_score, count)
            assert order.window(max_score, count) == want, (max_score, count)
    assert order.items() == store.feed_window("f", None, 1000)
    # strictly after a (score, id) boundary: the keyset read past a tie
    sid = order.items()[100][0]
    after = order.after(members[sid], sid, 10)
    assert after == order.items()[101:111]


def test_feed_order_moves_and_drops_members() -> None:
    order = FeedOrder([("a", 1.0), ("b", 2.0)])
    order.set("a", 3.0)
    order.set("c", 2.0)
    order.set("b", None)
    order.set("zz", None)  # not a member: nothing happens
    assert order.items() == [("a", 3.0), ("c", 2.0)] and len(order) == 2 and order.get("b") is None


# -- the columns ------------------------------------------------------------------------------------
def test_table_holds_what_the_fields_parse_to(store: RedisScoreStore) -> None:
    ids = seed_catalog(store, n=200)
    values = store.read_fields(ids, TABLE_FIELDS)
    parsed = SongBatch.from_fields(ids, values)
    table = SongTable(["f"], capacity=4)  # grows as it fills
    table.upsert(parsed)
    scored = [sid for sid, ok in zip(ids, parsed.scored.tolist(), strict=True) if ok]
    assert len(table) == len(scored) < len(ids) and table.capacity >= len(scored)
    rows = table.rows(ids)
    assert [r >= 0 for r in rows.tolist()] == parsed.scored.tolist()
    got = table.batch(rows[rows >= 0], NOW, filters=True)
    want = SongBatch.from_fields(scored, store.read_fields(scored, WRITE_FIELDS), NOW)
    for column in ("scores", "model_rate", "plays", "likes", "created_ts", "duration_s"):
        np.testing.assert_array_equal(getattr(got, column), getattr(want, column), err_msg=column)
    assert got.song_ids == want.song_ids and got.generators == want.generators and got.raw_tags == want.raw_tags


def test_table_rows_are_reused_and_unscored_songs_leave(store: RedisScoreStore) -> None:
    table = SongTable([])
    writer_ids = ["a", "b", "c"]
    fields = [[repr(3.0)] * len(TABLE_FIELDS) for _ in writer_ids]
    table.upsert(SongBatch.from_fields(writer_ids, fields))
    row_b = table.row_of["b"]
    # "b" loses its scores (a hash with engagement only): its row is freed, then reused
    gone = [None] * len(TABLE_FIELDS)
    table.upsert(SongBatch.from_fields(["b"], [gone]))
    assert "b" not in table and len(table) == 2
    table.upsert(SongBatch.from_fields(["d"], [fields[0]]))
    assert table.row_of["d"] == row_b and table.ids[row_b] == "d"
    with pytest.raises(ValueError, match="TABLE_FIELDS"):
        table.upsert(SongBatch.from_fields(["e"], [fields[0][: len(WRITE_FIELDS)]]))


def test_table_counts_songs_by_model_and_marks_untrained_ones() -> None:
    """What /readyz and /metrics report of the models, and what marks an item untrained."""
    table = SongTable([])
    width = len(WRITE_FIELDS)

    def row(version: str, untrained: str | None) -> list[str | None]:
        return [repr(3.0)] * width + [version, untrained]

    table.upsert(
        SongBatch.from_fields(
            ["a", "b", "c", "d"], [row("seed", "1"), row("seed", "1"), row("apex", None), row("apex", "0")]
        )
    )
    assert table.models() == {"seed": (2, 2), "apex": (2, 0)}
    got = table.batch(table.rows(["a", "c", "b"]))
    assert got.untrained is not None and got.untrained.tolist() == [True, False, True]
    table.upsert(SongBatch.from_fields(["a"], [row("apex", None)]))  # rescored by the trained head
    table.remove(["b"])
    assert table.models() == {"apex": (3, 0)}


def test_tag_sets_of_removed_songs_are_dropped_and_filters_stay_exact() -> None:
    """Free-form tags (one tags value per song): the table keeps the tag sets of the songs it holds, not
    of every song it has seen, and request tag filters (their kept masks too) still select exactly."""
    table = SongTable(["f"], capacity=8)
    at = TABLE_FIELDS.index("tags")

    def fields(tags: str | None) -> list[str | None]:
        row: list[str | None] = [repr(3.0)] * len(TABLE_FIELDS)
        row[at] = tags
        return row

    live: dict[str, str | None] = {}

    def write(songs: Mapping[str, str | None]) -> None:
        table.upsert(SongBatch.from_fields(list(songs), [fields(t) for t in songs.values()]))
        live.update(songs)

    def check(wanted: frozenset[str], mode: TagMode) -> None:
        ids = sorted(live)
        got = RequestFilters(tags=tuple(sorted(wanted)), tag_mode=mode).mask(table, table.rows(ids))
        want = [tags_match(parse_tags(live[i]), wanted, mode) for i in ids]
        assert got.tolist() == want, (wanted, mode)

    write({f"keep{i}": ("rock,keep" if i % 2 else None) for i in range(40)})  # songs that stay throughout
    seen = 2
    for n in range(24):  # each round's songs arrive with tags of their own, then leave
        batch = {f"r{n}-{i}": f"lofi,prompt-{n}-{i}" + (",rock" if i % 3 == 0 else "") for i in range(400)}
        write(batch)
        write({f"keep{n}": f"keep,retagged-{n}"})  # a song that stays gets other tags: its old set is dead
        seen += len(batch) + 1
        filters: list[tuple[frozenset[str], TagMode]] = [
            (frozenset({"rock"}), "any"),  # asked every round: its kept mask lives through every drop
            (frozenset({"lofi", "rock"}), "all"),
            (frozenset({f"prompt-{n}-3", f"prompt-{n - 1}-3", f"retagged-{n}"}), "any"),
            (frozenset({"keep"}), "any"),
        ]
        for wanted, mode in filters:
            check(wanted, mode)
        gone = list(batch)[: 300 if n % 2 else 400]
        if n % 2:  # leave through a takedown, or through the change log (scores gone)
            table.remove(gone)
        else:
            table.upsert(SongBatch.from_fields(gone, [[None] * len(TABLE_FIELDS)] * len(gone)))
        for song_id in gone:
            del live[song_id]
        assert len(table) == len(live)
        bound = 2 * len(live) + _TAG_SLACK + 1
        assert len(table.tag_sets) <= bound and len(table._tags) <= bound, (n, len(table.tag_sets), len(live))
        check(frozenset({"rock"}), "any")
        check(frozenset({f"prompt-{n}-3"}), "any")  # a removed song's tag: none of the live songs has it
    assert seen > 4 * len(table.tag_sets)  # sets were dropped, not merely kept under a large bound
    assert len(table.tag_sets) == len(table._tag_code) == len(table._tags) + 1  # one each, and code 0 for none


def test_generator_names_and_model_versions_of_removed_songs_are_dropped() -> None:
    """A producer naming a build per song: the table keeps the names its songs have, not every name it has
    seen, and every row still reads back its own generator and model, which generator filters select by."""
    table = SongTable(["f"], capacity=8)
    at_gen, at_model = TABLE_FIELDS.index("generator"), TABLE_FIELDS.index("model_version")

    def fields(generator: str, model: str) -> list[str | None]:
        row: list[str | None] = [repr(3.0)] * len(TABLE_FIELDS)
        row[at_gen], row[at_model] = generator, model
        return row

    live: dict[str, tuple[str, str]] = {}

    def write(songs: Mapping[str, tuple[str, str]]) -> None:
        table.upsert(SongBatch.from_fields(list(songs), [fields(*v) for v in songs.values()]))
        live.update(songs)

    write({f"keep{i}": ("suno-v5" if i % 2 else "udio", "m1") for i in range(40)})  # songs that stay throughout
    seen = 3
    for n in range(24):  # each round's songs arrive with a generator and model of their own, then most leave
        write({f"r{n}-{i}": (f"suno-build-{n}-{i}", f"m-{n}-{i}") for i in range(500)})
        write({f"keep{n}": (f"renamed-{n}", f"m-re-{n}")})  # a song that stays changes generator: its old is dead
        seen += 501
        gone = [f"r{n}-{i}" for i in range(0 if n % 2 else 20, 500)]
        if n % 2:  # leave through a takedown, or through the change log (scores gone)
            table.remove(gone)
        else:
            table.upsert(SongBatch.from_fields(gone, [[None] * len(TABLE_FIELDS)] * len(gone)))
        for song_id in gone:
            del live[song_id]
        bound = 2 * len(live) + _NAME_SLACK + 1
        assert len(table.generator_names) <= bound and len(table.model_names) <= bound, (n, len(live))
        ids = sorted(live)
        got = table.batch(table.rows(ids))
        assert got.generators == [live[i][0] for i in ids]
        models = [table.model_names[c] for c in table.model[table.rows(ids)].tolist()]
        assert models == [live[i][1] for i in ids]
        for wanted in (("udio",), ("suno-v5", f"suno-build-{n}-7", f"renamed-{n}"), (f"suno-build-{n}-300",)):
            mask = RequestFilters(generators=wanted).mask(table, table.rows(ids))
            assert mask.tolist() == [live[i][0] in wanted for i in ids], wanted
    assert seen > 4 * len(table.generator_names)  # names were dropped, not merely kept under a large bound
    assert len(table._generator_code) == len(table.generator_names) and len(table._model_code) == len(table.model_names)
    assert sum(table.models().get(m, (0, 0))[0] for m in {v[1] for v in live.values()}) == len(live)


# -- the change log ---------------------------------------------------------------------------------
def test_every_store_write_is_logged(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None, filters={"max_age_hours": 10**5})})
    writer = FeedWriter(s, store)

    async def run() -> list[Any]:
        reads = store.async_reads()
        try:
            start = await reads.change_position()
            writer.on_scored([record("a"), record("b")], now=NOW)
            store.write_feed_entries([], {"f": {"a": None}})
            writer.rebuild(now=NOW)
            writer.trim(now=NOW + 2e5 * 3600)  # past the feed's age limit: every song goes
            store.write_songs([record("c")], "f")
            return await reads.read_changes(start, 100, 0.0)
        finally:
            await reads.close()

    changes = asyncio.run(run())
    assert [(c.song_ids, c.feeds) for c in changes] == [
        (("a", "b"), ()),
        (("a",), ()),
        ((), ("f",)),  # the rebuild replaced the feed whole
        (("a", "b"), ()),  # the trim: the songs it removed
        (("c",), ()),
    ]
    assert all(abs(c.at - changes[0].at) < 60 for c in changes)
    assert [c.position for c in changes] == sorted(
        {c.position for c in changes}, key=lambda p: tuple(map(int, p.split("-")))
    )


def test_a_follower_applies_changes_and_reloads_when_the_log_moved_past_it(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)})
    writer = FeedWriter(s, store)
    writer.on_scored([record(f"s{i}", likes=i) for i in range(5)], now=NOW)

    async def run() -> None:
        reads = store.async_reads()
        sync = TableSync(reads, ["f"], poll_s=0.05)
        try:
            table = await sync.load()
            assert len(table) == 5 and [sid for sid, _ in table.feeds["f"].items()][:2] == ["s4", "s3"]
            writer.on_scored([record("s9", likes=99)], now=NOW)  # new, and first in the feed
            store.write_feed_entries([], {"f": {"s4": None}})  # out of the feed
            assert await sync.step() == 2
            assert sync.fresh_at is not None and abs(time.time() - sync.fresh_at) < 5  # the read reached the end
            order = [sid for sid, _ in sync.table.feeds["f"].items()]  # type: ignore[union-attr]
            assert order[:2] == ["s9", "s3"] and "s4" not in order and "s9" in sync.table  # type: ignore[operator]
            # the log is trimmed past the follower's position: it cannot know what it missed
            writer.on_scored([record("s10", likes=98)], now=NOW)
            store.client.xtrim(store.keys.changes(), maxlen=0)
            writer.on_scored([record("s11", likes=97)], now=NOW)
            assert await reads.changes_lost(sync.position)
            sync.start()
            assert await sync.caught_up(10.0)
            assert sync.table is not table and {"s10", "s11"} <= set(sync.table.row_of)  # type: ignore[union-attr]
        finally:
            await sync.close()
            await reads.close()

    asyncio.run(run())


# -- the API while the table loads ------------------------------------------------------------------
def test_feeds_answer_503_until_the_table_is_loaded(
    settings: Settings, store: RedisScoreStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)})
    s = s.model_copy(update={"api": ApiSettings(table_startup_wait_s=0)})
    FeedWriter(s, store).on_scored([record("a")], now=NOW)
    gate = asyncio.Event()
    original = TableSync.load

    async def slow_load(self: TableSync) -> Any:
        await gate.wait()
        return await original(self)

    monkeypatch.setattr(TableSync, "load", slow_load)
    with TestClient(create_app(s)) as client:
        r = client.get("/v1/feeds/f")
        assert r.status_code == 503 and r.json()["error"] == "table_loading" and r.headers["retry-after"] == "1"
        assert client.post("/v1/rank", json={"candidates": ["a"]}).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["table"] == {"ready": False, "songs": 0}
        assert client.get("/healthz").status_code == 200
        client.portal.call(gate.set)  # type: ignore[union-attr]
        reader: FeedReader = client.app.state.reader  # type: ignore[attr-defined]
        assert client.portal.call(reader.sync.wait_loaded, 10.0)  # type: ignore[union-attr]
        assert [i["song_id"] for i in client.get("/v1/feeds/f").json()["items"]] == ["a"]
        assert client.get("/readyz").json()["table"] == {"ready": True, "songs": 1}


def test_a_reader_without_its_table_says_so(settings: Settings, store: RedisScoreStore) -> None:
    async def run() -> None:
        reads = store.async_reads()
        try:
            reader = FeedReader(settings, reads)
            with pytest.raises(TableNotReady):
                await reader.page(settings.feed.name, 10)
        finally:
            await reads.close()

    asyncio.run(run())


def metric(client: TestClient, name: str) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_pages_go_on_through_a_store_outage(stack: EmbeddedStack, settings: Settings, store: RedisScoreStore) -> None:
    """The table serves while Redis is down (the last calibration scale kept), and follows again after."""
    s = with_feeds(settings, {"f": plain(half_life_hours=None)})
    s = s.model_copy(update={"api": ApiSettings(calibration_ttl_s=0, table_poll_s=0.1)})
    writer = FeedWriter(s, store)
    writer.on_scored([record("a", likes=10), record("b", likes=20)], now=NOW)
    add_vectors(s, {"a": np.ones(DIM)})  # an index, so that readiness depends on the table alone
    with TestClient(create_app(s)) as client:
        assert client.get("/readyz").status_code == 200
        before = client.get("/v1/feeds/f").json()
        assert [i["song_id"] for i in before["items"]] == ["b", "a"]
        stack.stop_one("redis")
        try:
            during = client.get("/v1/feeds/f")
            assert during.status_code == 200
            assert [(i["song_id"], i["score"]) for i in during.json()["items"]] == [
                (i["song_id"], i["score"]) for i in before["items"]
            ]
            ranked = client.post("/v1/rank", json={"candidates": ["a", "b", "zz"]})
            assert ranked.status_code == 200 and ranked.json()["unknown"] == ["zz"]
            ready = client.get("/readyz")  # still serving: still ready, and it says Redis is down
            assert ready.status_code == 200 and ready.json()["redis"] is False
            deadline = time.monotonic() + 15  # the follower cannot read the log: it says how far behind
            while metric(client, "apexrank_table_behind_seconds") < 1.0:
                assert time.monotonic() < deadline, "apexrank_table_behind_seconds never grew"
                time.sleep(0.1)
            assert metric(client, "apexrank_table_errors_total") > 0
        finally:
            stack.up()
        deadline = time.monotonic() + 30
        while True:  # Redis answers "loading" while it reads its dataset back
            try:
                writer.on_scored([record("c", likes=30)], now=NOW)
                break
            except redis.exceptions.ConnectionError:  # BusyLoadingError is one
                assert time.monotonic() < deadline, "Redis did not come back"
                time.sleep(0.1)
        while time.monotonic() < deadline:
            items = client.get("/v1/feeds/f").json()["items"]
            if [i["song_id"] for i in items] == ["c", "b", "a"]:
                break
            time.sleep(0.05)
        assert [i["song_id"] for i in items] == ["c", "b", "a"]


def test_a_long_poll_never_outlasts_the_socket_timeout(store: RedisScoreStore) -> None:
    """``api.table_poll_s`` beyond the store's socket timeout waits less, never times out."""
    short = RedisScoreStore(RedisStoreConfig(url=store.config.url, key_prefix=store.prefix, socket_timeout_s=0.4))

    async def run() -> list[Any]:
        reads = short.async_reads()
        try:
            return await reads.read_changes(await reads.change_position(), 10, 5.0)
        finally:
            await reads.close()

    try:
        assert asyncio.run(run()) == []
    finally:
        short.close()


def test_a_load_misses_no_member_while_the_feed_moves(settings: Settings, store: RedisScoreStore) -> None:
    """Members move while a large feed is read in batches: after the load and the log, the table's
    order is Redis's (ranges by rank skipped the member at a range's edge when one moved up)."""
    s = with_feeds(settings, {"f": plain(half_life_hours=None)})
    writer = FeedWriter(s, store)
    writer.on_scored([record(f"s{i:03d}", likes=i / 4) for i in range(400)], now=NOW)

    async def run() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        reads = store.async_reads()
        scan = reads.scan_feed

        async def moving_scan(feed: str, batch: int = 10_000) -> Any:
            n = 0
            async for chunk in scan(feed, 50):
                yield chunk
                n += 1
                # between batches: low songs jump to the top, top songs leave the feed
                writer.on_scored([record(f"s{n:03d}", likes=99.0 - n)], now=NOW)
                store.write_feed_entries([], {"f": {f"s{399 - n:03d}": None}})

        reads.scan_feed = moving_scan  # type: ignore[method-assign]
        sync = TableSync(reads, ["f"], poll_s=0.05)
        try:
            await sync.load()
            while await sync.step():
                pass
            assert sync.table is not None
            return sync.table.feeds["f"].items(), store.feed_window("f", None, 1000)
        finally:
            await reads.close()

    got, want = asyncio.run(run())
    assert len(want) < 400 and got == want


def test_the_change_log_is_trimmed_by_age(store: RedisScoreStore) -> None:
    """Entries older than ``changes_retention_s`` go as writes come: its memory follows the write rate."""
    key = store.keys.changes()
    for i in range(1, 301):  # three stream nodes of entries from 1970
        store.client.xadd(key, {"ids": f"old{i}"}, id=f"1000-{i}")
    store.write_songs([record("fresh")], "f")
    left = store.client.xrange(key)
    assert left[-1][1]["ids"] == "fresh"
    assert len(left) < 301 and left[0][0] != "1000-1"  # the oldest node went
