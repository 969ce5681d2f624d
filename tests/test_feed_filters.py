"""Request-time filters of feed pages and reranks (issue 16, item 3), on the real Redis through the API.

Every walk goes page by page through cursors, and is compared with the songs computed from the
records written: exactly those that pass, once each, in the unfiltered walk's order.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections import Counter
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from indexes import RedisScoreStore
from indexes.base import SongRecord
from ranker.serving.api import create_app
from ranker.serving.client import Filters
from ranker.serving.cursor import Cursor
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, FeedPolicy, Settings
from tests.test_policy import NOW, plain, record, with_feeds

GENERATORS = ("gen-a", "gen-b", "gen-c", "gen-d")
TAG_SETS: tuple[tuple[str, ...], ...] = ((), ("rock",), ("calm",), ("rock", "calm"), ("jazz", "calm"), ("jazz",))


def songs(n: int) -> list[SongRecord]:
    """``n`` songs over four generators, six tag sets (none among them) and ages of 0-96 hours."""
    out = []
    for i in range(n):
        rec = record(f"s{i:04d}", likes=20 + (i * 37) % 80, age_h=(i * 7) % 97, generator=GENERATORS[i % 4])
        tags = TAG_SETS[(i // 4) % len(TAG_SETS)]
        out.append(replace(rec, extra={"tags": ",".join(tags)} if tags else {}))
    return out


def passes(rec: SongRecord, q: dict[str, Any]) -> bool:
    """The filters' meaning, written from the records (the reference the API is held to)."""
    tags = set(rec.extra.get("tags", "").split(",")) - {""}
    age_h = (NOW - datetime.fromisoformat(rec.created_at).timestamp()) / 3600.0
    gens = q.get("generator", [])
    want = set(q.get("tag", []))
    excluded = {x for v in q.get("exclude", []) for x in v.split(",")}
    if gens and rec.generator not in gens:
        return False
    if want and (not want <= tags if q.get("tag_mode") == "all" else not want & tags):
        return False
    if "max_age_hours" in q and not age_h < q["max_age_hours"]:
        return False
    return rec.song_id not in excluded


def walk(client: TestClient, feed: str, limit: int, query: dict[str, Any]) -> list[dict[str, Any]]:
    """Every item of a filtered walk, page by page through the cursors (the filters repeated)."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(500):
        params = {"limit": limit, **query, **({"cursor": cursor} if cursor else {})}
        r = client.get(f"/v1/feeds/{feed}", params=params)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if not cursor:
            return items
    raise AssertionError("the walk did not end")


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [str(i["song_id"]) for i in items]


def app_settings(settings: Settings, feed: FeedPolicy, **api: Any) -> Settings:
    s = with_feeds(settings, {"f": feed}, calibrate=False)
    return s.model_copy(update={"api": ApiSettings(page_cache_ttl_s=0.0, **api)})


CASES: dict[str, dict[str, Any]] = {
    "one generator": {"generator": ["gen-b"]},
    "two generators": {"generator": ["gen-c", "gen-a"]},
    "unknown generator": {"generator": ["nobody"]},
    "tag any": {"tag": ["rock", "jazz"]},
    "tag all": {"tag": ["rock", "calm"], "tag_mode": "all"},
    "max age": {"max_age_hours": 30.5},
    "exclude repeated": {"exclude": ["s0000", "s0003", "s0010", "s0011"]},
    "exclude comma list": {"exclude": ["s0000,s0003", "s0010,s0011,no-such-song"]},
    "combined": {
        "generator": ["gen-a", "gen-b"],
        "tag": ["calm"],
        "max_age_hours": 60.5,
        "exclude": ["s0008,s0012", "s0017"],
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_filter_alone_and_combined_selects_exactly_across_pages(
    settings: Settings, store: RedisScoreStore, name: str
) -> None:
    recs = songs(160)
    s = app_settings(settings, plain(half_life_hours=None))
    FeedWriter(s, store).on_scored(recs, now=NOW)
    query = CASES[name]
    by_id = {r.song_id: r for r in recs}
    with TestClient(create_app(s)) as client:
        everything = ids(walk(client, "f", 9, {}))
        got = ids(walk(client, "f", 7, query))
    assert sorted(everything) == sorted(by_id)  # the unfiltered walk: every song once
    want = [sid for sid in everything if passes(by_id[sid], query)]
    assert got == want, name  # exactly the passing songs, once each, in the unfiltered order
    if name != "unknown generator":
        assert 0 < len(want) < len(recs)


def test_a_scan_bound_gives_short_pages_that_still_cover_exactly(settings: Settings, store: RedisScoreStore) -> None:
    """Rarer matches than ``api.filter_scan_rows`` rows hold: pages come back short (some empty), the
    cursor resumes after each scanned stretch, and the walk still serves exactly the passing songs."""
    recs = songs(700)
    s = app_settings(settings, plain(half_life_hours=None), filter_scan_rows=100)
    FeedWriter(s, store).on_scored(recs, now=NOW)
    query: dict[str, Any] = {"generator": ["gen-d"], "tag": ["rock", "calm"], "tag_mode": "all"}
    by_id = {r.song_id: r for r in recs}
    with TestClient(create_app(s)) as client:
        everything = ids(walk(client, "f", 50, {}))
        pages = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 20, **query, **({"cursor": cursor} if cursor else {})}
            body = client.get("/v1/feeds/f", params=params).json()
            pages.append(ids(body["items"]))
            cursor = body["next_cursor"]
            if not cursor:
                break
    want = [sid for sid in everything if passes(by_id[sid], query)]
    assert [sid for p in pages for sid in p] == want
    assert len(pages) > 2 and any(len(p) < 20 for p in pages[:-1])  # the bound cut pages short


def test_tag_any_and_all_differ_as_documented(settings: Settings, store: RedisScoreStore) -> None:
    tagged = {"both": "rock,calm", "rock": "rock", "calm": "calm", "none": "", "jazz": "jazz,rock,calm"}
    recs = [replace(record(k, likes=90 - 10 * n), extra={"tags": v}) for n, (k, v) in enumerate(tagged.items())]
    s = app_settings(settings, plain(half_life_hours=None))
    FeedWriter(s, store).on_scored(recs, now=NOW)
    with TestClient(create_app(s)) as client:
        any_of = ids(walk(client, "f", 2, {"tag": ["rock", "calm"]}))
        all_of = ids(walk(client, "f", 2, {"tag": ["calm", "rock"], "tag_mode": "all"}))
    assert any_of == ["both", "rock", "calm", "jazz"]
    assert all_of == ["both", "jazz"]


def test_a_cursor_is_bound_to_its_filters(settings: Settings, store: RedisScoreStore) -> None:
    s = app_settings(settings, plain(half_life_hours=None))
    FeedWriter(s, store).on_scored(songs(60), now=NOW)
    query = {"generator": ["gen-a", "gen-b"], "exclude": ["s0001", "s0004"]}
    with TestClient(create_app(s)) as client:
        first = client.get("/v1/feeds/f", params={"limit": 5, **query}).json()
        cursor = first["next_cursor"]
        assert cursor
        # the same filters, spelled otherwise (order, repeats, a comma list): the same walk
        same = {"generator": ["gen-b", "gen-a", "gen-b"], "exclude": "s0004,s0001"}
        again = client.get("/v1/feeds/f", params={"limit": 5, "cursor": cursor, **same})
        assert again.status_code == 200, again.text
        assert not set(ids(again.json()["items"])) & set(ids(first["items"]))
        others: list[dict[str, Any]] = [
            {},  # no filters
            {"generator": ["gen-a"]},
            {**query, "tag": ["rock"]},
            {**query, "max_age_hours": 50},
            {"generator": ["gen-a", "gen-b"], "exclude": ["s0001"]},
        ]
        for other in others:
            r = client.get("/v1/feeds/f", params={"limit": 5, "cursor": cursor, **other})
            assert r.status_code == 400, other
            assert r.json()["error"] == "cursor_filters_mismatch" and "filters" in r.json()["message"]
        plain_cursor = client.get("/v1/feeds/f", params={"limit": 5}).json()["next_cursor"]
        r = client.get("/v1/feeds/f", params={"limit": 5, "cursor": plain_cursor, **query})
        assert r.status_code == 400 and r.json()["error"] == "cursor_filters_mismatch"


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("GET", {"tag": ["rock"], "tag_mode": "some"}, "bad_tag_mode"),
    ("GET", {"max_age_hours": -1}, "bad_max_age"),
    ("GET", {"max_age_hours": 0}, "bad_max_age"),
    ("GET", {"max_age_hours": "nan"}, "bad_max_age"),
    ("GET", {"max_age_hours": "inf"}, "bad_max_age"),
    ("GET", {"max_age_hours": "soon"}, "invalid_request"),
    ("GET", {"generator": [f"g{i}" for i in range(5)]}, "too_many_filter_values"),
    ("GET", {"tag": [f"t{i}" for i in range(5)]}, "too_many_filter_values"),
    ("GET", {"exclude": ",".join(f"s{i}" for i in range(7))}, "too_many_filter_values"),
    ("GET", {"exclude": ["ok", "bad id"]}, "bad_filter_value"),
    ("GET", {"generator": [""]}, "bad_filter_value"),
    ("POST", {"tag_mode": "most"}, "bad_tag_mode"),
    ("POST", {"max_age_hours": -2}, "bad_max_age"),
    ("POST", {"exclude": [f"s{i}" for i in range(7)]}, "too_many_filter_values"),
    ("POST", {"colour": "blue"}, "invalid_request"),
]


@pytest.mark.parametrize(("method", "query", "code"), BAD, ids=[f"{m}-{c}-{n}" for n, (m, _, c) in enumerate(BAD)])
def test_bad_filter_values_get_a_4xx_with_a_code(
    settings: Settings, store: RedisScoreStore, method: str, query: dict[str, Any], code: str
) -> None:
    s = app_settings(settings, plain(), max_filter_values=4, max_exclude=6)
    FeedWriter(s, store).on_scored(songs(4), now=NOW)
    with TestClient(create_app(s)) as client:
        if method == "GET":
            r = client.get("/v1/feeds/f", params=query)
        else:
            r = client.post("/v1/rank", json={"candidates": ["s0000"], "filters": query})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == code and r.json()["message"]


def test_rank_applies_the_request_filters(settings: Settings, store: RedisScoreStore) -> None:
    recs = songs(40)
    s = app_settings(settings, plain(half_life_hours=None))
    FeedWriter(s, store).on_scored(recs, now=NOW)
    by_id = {r.song_id: r for r in recs}
    candidates = [r.song_id for r in recs[::-1]] + ["ghost"]
    query = {"generator": ["gen-a", "gen-c"], "tag": ["calm"], "max_age_hours": 70.5, "exclude": ["s0008"]}
    flt = Filters(generators=("gen-a", "gen-c"), tags=("calm",), max_age_hours=70.5, exclude=("s0008",))
    with TestClient(create_app(s)) as client:
        r = client.post("/v1/rank", json={"candidates": candidates, "filters": flt.body()})
        assert r.status_code == 200, r.text
        body = r.json()
        plain_rank = client.post("/v1/rank", json={"candidates": candidates}).json()
        # the client's query encoding of the same filters, through the feed route
        feed = ids(walk(client, "f", 6, flt.query()))
    kept = {sid for sid in by_id if passes(by_id[sid], query)}
    assert set(ids(body["items"])) == kept and 0 < len(kept) < len(recs)
    assert ids(body["items"]) == [sid for sid in ids(plain_rank["items"]) if sid in kept]  # same order
    assert sorted(body["filtered"]) == sorted(set(by_id) - kept)  # never silently dropped
    assert body["unknown"] == ["ghost"]
    assert set(feed) == kept and len(feed) == len(kept)


def test_exploration_slots_obey_the_filters(settings: Settings, store: RedisScoreStore) -> None:
    recs = songs(240)
    feed = plain(half_life_hours=None, explore_share=0.25, explore_pool=12)
    s = app_settings(settings, feed)
    FeedWriter(s, store).on_scored(recs, now=NOW)
    by_id = {r.song_id: r for r in recs}
    query = {"generator": ["gen-a", "gen-d"], "tag": ["rock", "jazz"]}
    with TestClient(create_app(s)) as client:
        items = walk(client, "f", 8, query)
    explored = [i for i in items if i["explore"]]
    assert len(explored) >= 5  # exploration ran on the filtered pages
    assert all(passes(by_id[i["song_id"]], query) for i in explored)
    seen = Counter(ids(items))
    assert set(seen) == {sid for sid in by_id if passes(by_id[sid], query)} and set(seen.values()) == {1}


def test_the_page_cache_keys_on_the_filters(settings: Settings, store: RedisScoreStore) -> None:
    recs = songs(80)
    s = app_settings(settings, plain(half_life_hours=None))
    s = s.model_copy(update={"api": ApiSettings(page_cache_ttl_s=600.0)})
    FeedWriter(s, store).on_scored(recs, now=NOW)
    by_id = {r.song_id: r for r in recs}
    one: dict[str, Any] = {"generator": ["gen-c"]}
    other: dict[str, Any] = {"generator": ["gen-c"], "exclude": ["s0002"]}
    with TestClient(create_app(s)) as client:
        unfiltered = client.get("/v1/feeds/f", params={"limit": 10}).json()  # cached first
        first = client.get("/v1/feeds/f", params={"limit": 10, **one}).json()
        second = client.get("/v1/feeds/f", params={"limit": 10, **other}).json()
        cached = client.get("/v1/feeds/f", params={"limit": 10, **one}).json()
        reader = client.app.state.reader  # type: ignore[attr-defined]
        assert len(reader.page_cache) == 3  # one window per filter set
    assert any(not passes(by_id[sid], one) for sid in ids(unfiltered["items"]))
    assert all(passes(by_id[sid], one) for sid in ids(first["items"])) and len(first["items"]) == 10
    assert "s0002" in ids(first["items"]) and "s0002" not in ids(second["items"])
    assert ids(cached["items"]) == ids(first["items"]) and cached["next_cursor"] == first["next_cursor"]


def test_tag_sets_that_arrive_later_are_filtered_too(settings: Settings, store: RedisScoreStore) -> None:
    """The table decides a tag filter once per tag set and keeps the answer: songs with a tag set it
    has not seen before, arriving through the change log after that, are decided on arrival."""
    s = app_settings(settings, plain(half_life_hours=None))
    writer = FeedWriter(s, store)
    writer.on_scored(songs(12), now=NOW)
    query = {"tag": ["folk", "rock"]}
    with TestClient(create_app(s)) as client:
        before = ids(walk(client, "f", 5, query))
        late = [
            replace(record("late-folk", likes=99), extra={"tags": "folk,harp"}),
            replace(record("late-harp", likes=98), extra={"tags": "harp"}),
        ]
        writer.on_scored(late, now=NOW)
        deadline = time.monotonic() + 10
        while "late-harp" not in ids(walk(client, "f", 50, {})) and time.monotonic() < deadline:
            time.sleep(0.02)
        after = ids(walk(client, "f", 5, query))
    assert "late-folk" not in before and after == ["late-folk", *before]


def test_cursors_made_before_filters_still_walk_unfiltered(settings: Settings, store: RedisScoreStore) -> None:
    """A version 1 cursor (no filters tag) continues an unfiltered walk; with filters it is refused."""
    s = app_settings(settings, plain(half_life_hours=None))
    FeedWriter(s, store).on_scored(songs(10), now=NOW)
    with TestClient(create_app(s)) as client:
        first = client.get("/v1/feeds/f", params={"limit": 4}).json()
        cur = Cursor.decode(first["next_cursor"], "f")
        sid = cur.song_id.encode()
        raw = struct.pack(">BId", 1, zlib.crc32(b"f"), cur.score) + struct.pack(">B", len(sid)) + sid
        v1 = base64.urlsafe_b64encode(raw + struct.pack(">H", 0)).rstrip(b"=").decode()
        old = client.get("/v1/feeds/f", params={"limit": 4, "cursor": v1})
        new = client.get("/v1/feeds/f", params={"limit": 4, "cursor": first["next_cursor"]})
        refused = client.get("/v1/feeds/f", params={"limit": 4, "cursor": v1, "generator": "gen-a"})
    assert old.status_code == 200 and ids(old.json()["items"]) == ids(new.json()["items"])
    assert refused.status_code == 400 and refused.json()["error"] == "cursor_filters_mismatch"
