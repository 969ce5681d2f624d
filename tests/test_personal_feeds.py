"""Personal feeds (issue 16, item 2): ``?user=`` on feed pages and ``user`` on rank, on the real stack.

Songs are written through the FeedWriter into the session's Redis, their vectors into a real FAISS
index, and a listener's likes go through Kafka to the real FeedbackConsumer, which keeps their taste
and heard set; the API reads them back through the listener store's async reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consumers.stack import EmbeddedStack
from indexes import RedisScoreStore
from indexes.listeners import Listener, ListenerEvent
from ranker import stores
from ranker.serving.api import create_app
from ranker.serving.batch import SongBatch
from ranker.serving.client import ApexRankClient
from ranker.serving.reader import FeedReader
from ranker.serving.state import TABLE_FIELDS
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, FeedPolicy, Settings
from tests.test_api import add_vectors
from tests.test_policy import NOW, plain, record, with_feeds
from tests.test_taste import consume, event, send

N = 60
CLUSTERS = 3
DIM = 16


def vector(i: int) -> np.ndarray:
    """Song ``i``'s vector: near axis ``i % 3``, with its own noise (unit length)."""
    v = np.zeros(DIM, np.float32)
    v[i % CLUSTERS] = 1.0
    v += np.random.default_rng(i).normal(0, 0.15, DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def sid(i: int) -> str:
    return f"s{i:03d}"


def world(settings: Settings, store: RedisScoreStore, feed: FeedPolicy | None = None, window: int = 200) -> Settings:
    """N songs in feed order s000, s001, ... (likes falling slowly), clusters interleaved, with vectors."""
    s = with_feeds(settings, {"f": feed or plain(half_life_hours=None)}, calibrate=False)
    s = s.model_copy(
        update={
            "api": ApiSettings(page_cache_ttl_s=0.0, personal_window=window),
            "feed": s.feed.model_copy(update={"taste_weight": 1.0, "taste_evidence_half": 1.0}),
        }
    )
    FeedWriter(s, store).on_scored([record(sid(i), likes=80 - 0.2 * i) for i in range(N)])
    add_vectors(s, {sid(i): vector(i) for i in range(N)})
    return s


def listen(settings: Settings, user: str, likes: Sequence[int], plays: Sequence[int] = ()) -> None:
    """The user's likes and plays, through Kafka and the feedback consumer."""
    at = datetime.now(UTC) - timedelta(seconds=1)
    events = [event(user, sid(i), "like", at) for i in likes] + [event(user, sid(i), "play", at) for i in plays]
    send(settings, events)
    consume(settings)


def app(s: Settings, **kw: Any) -> FastAPI:
    """The API, scoring at one fixed instant (so two requests' bodies can be equal byte for byte)."""
    return create_app(s, clock=lambda: NOW + 60.0, **kw)


def page(client: TestClient, params: dict[str, Any]) -> dict[str, Any]:
    r = client.get("/v1/feeds/f", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def walk(client: TestClient, limit: int, **query: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    for _ in range(100):
        body = page(client, {"limit": limit, **query, **({"cursor": cursor} if cursor else {})})
        pages.append([i["song_id"] for i in body["items"]])
        cursor = body["next_cursor"]
        if not cursor:
            return pages
    raise AssertionError("the walk did not end")


def cluster(song_id: str) -> int:
    return int(song_id[1:]) % CLUSTERS


LIKED = [2, 5, 8]  # cluster 2, at the top of the feed


def test_liked_songs_pull_similar_songs_up_and_heard_ones_leave(settings: Settings, store: RedisScoreStore) -> None:
    s = world(settings, store)
    listen(s, "u1", LIKED, plays=[0])
    heard = {sid(i) for i in [*LIKED, 0]}
    with TestClient(app(s)) as client:
        cold = [i for p in walk(client, 10) for i in p]
        mine = [i for p in walk(client, 10, user="u1") for i in p]
    assert sorted(cold) == sorted(sid(i) for i in range(N))
    assert sorted(mine) == sorted(set(cold) - heard)  # every song but the heard ones, once
    # The whole feed is the taste block (60 < api.personal_window): the liked cluster comes first.
    near = [x for x in mine if cluster(x) == 2]
    assert mine[: len(near)] == near
    assert sum(cluster(x) == 2 for x in cold[:10]) <= 4
    for x in near:  # each song near the liked ones ranks higher for the listener than in the cold walk
        assert mine.index(x) <= cold.index(x), x
    assert sum(mine.index(x) < cold.index(x) for x in near) >= len(near) - 2


@pytest.mark.parametrize("window", [200, 20])
def test_heard_songs_never_appear_and_none_repeats_while_the_taste_moves(
    settings: Settings, store: RedisScoreStore, window: int
) -> None:
    """Across every cursor page, with likes arriving mid-walk (the order is recomputed at each page
    from the taste as it is then): no heard song is served, and no song twice. With a window of 20
    the walk crosses from the taste block into the feed's own order."""
    s = world(settings, store, plain(half_life_hours=None, explore_share=0.2, explore_pool=6), window)
    listen(s, "u2", LIKED, plays=[1, 4, 10, 33])
    with TestClient(app(s)) as client:
        served: list[str] = []
        first = page(client, {"limit": 8, "user": "u2"})
        served += [i["song_id"] for i in first["items"]]
        items = list(first["items"])
        later = [i for i in range(N) if i % CLUSTERS == 0 and sid(i) not in served][:4]
        listen(s, "u2", later)  # the taste turns towards cluster 0 between pages; those songs are now heard
        cursor = first["next_cursor"]
        while cursor:
            body = page(client, {"limit": 8, "user": "u2", "cursor": cursor})
            served += [i["song_id"] for i in body["items"]]
            items += body["items"]
            cursor = body["next_cursor"]
    heard = {sid(i) for i in [*LIKED, 1, 4, 10, 33, *later]}
    assert len(served) == len(set(served))  # none twice
    assert not heard & set(served)
    assert set(served) == {sid(i) for i in range(N)} - heard  # nothing lost either
    # The taste re-orders only the block (the first `window` eligible songs of the walk); below it, the
    # feed's own order, with no taste term. A block of 200 is the whole feed.
    tasted = [i["song_id"] for i in items if "taste" in i["components"]]
    if window == 200:
        assert len(tasted) == len(served)
    else:  # the block's songs liked mid-walk are heard, so left out
        assert window - len(later) <= len(tasted) <= window


def test_a_new_user_gets_exactly_the_cold_start_pages(settings: Settings, store: RedisScoreStore) -> None:
    """Same bytes, page by page through the cursors, with the same seeded exploration."""
    s = world(settings, store, plain(half_life_hours=None, explore_share=0.2, explore_pool=6, dedup_threshold=0.9))
    bodies: dict[str, list[bytes]] = {}
    for who in ("", "nobody-yet"):
        with TestClient(app(s, explore_rng=np.random.default_rng(11))) as client:
            cursor, got = None, []
            while True:
                params = {"limit": 7, **({"user": who} if who else {}), **({"cursor": cursor} if cursor else {})}
                r = client.get("/v1/feeds/f", params=params)
                assert r.status_code == 200, r.text
                rid = r.json()["request_id"]  # each response's own: everything else is compared byte for byte
                got.append(r.content.replace(f',"request_id":"{rid}"'.encode(), b""))
                cursor = r.json()["next_cursor"]
                if not cursor:
                    break
            bodies[who] = got
    assert len(bodies[""]) > 3
    assert bodies["nobody-yet"] == bodies[""]


def test_explanations_carry_the_taste_term(settings: Settings, store: RedisScoreStore) -> None:
    s = world(settings, store)
    listen(s, "u3", LIKED)
    taste = np.sum([vector(i) for i in LIKED], axis=0, dtype=np.float64)
    taste = taste / np.linalg.norm(taste)
    # The cosine is taken off the catalog's mean direction (ranker.serving.personal): here the mean of the N vectors.
    centre = np.sum([vector(i) for i in range(N)], axis=0, dtype=np.float64)
    centre /= np.linalg.norm(centre)
    taste = taste - (taste @ centre) * centre
    taste /= np.linalg.norm(taste)

    def off_centre(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64) - float(v @ centre) * centre
        return v / np.linalg.norm(v)

    with TestClient(app(s)) as client:
        mine = page(client, {"limit": 10, "user": "u3"})["items"]
        cold = client.post("/v1/rank", json={"candidates": [i["song_id"] for i in mine], "feed": "f"}).json()
    base = {i["song_id"]: i["score"] for i in cold["items"]}
    for item in mine:
        term = item["components"]["taste"]
        i = int(item["song_id"][1:])
        assert term["cosine"] == pytest.approx(float(off_centre(vector(i)) @ taste), abs=1e-5)
        assert term["weight"] == pytest.approx(3.0 / (3.0 + 1.0), rel=1e-3)  # E / (E + taste_evidence_half)
        assert term["contribution"] == pytest.approx(1.0 * term["weight"] * term["cosine"])
        assert item["score"] == pytest.approx(base[item["song_id"]] * math.exp(term["contribution"]), rel=1e-9)


def test_rank_with_a_user(settings: Settings, store: RedisScoreStore) -> None:
    s = world(settings, store)
    listen(s, "u4", LIKED, plays=[0])
    candidates = [sid(i) for i in range(12)]
    with TestClient(app(s)) as client:
        cold = client.post("/v1/rank", json={"candidates": candidates, "feed": "f"}).json()
        mine = client.post("/v1/rank", json={"candidates": candidates, "feed": "f", "user": "u4"}).json()
        fresh = client.post("/v1/rank", json={"candidates": candidates, "feed": "f", "user": "someone-new"}).json()
    assert fresh.pop("request_id") != cold.pop("request_id")  # each response its own id; the rest equal
    assert fresh == cold
    assert sorted(mine["filtered"]) == sorted(sid(i) for i in [0, *LIKED])  # heard: filtered, never dropped
    order = [i["song_id"] for i in mine["items"]]
    near = [x for x in order if cluster(x) == 2]
    assert near and order[: len(near)] == near  # s011, the one cluster-2 candidate unheard, leads
    assert all("taste" in i["components"] for i in mine["items"])
    unheard = [i["song_id"] for i in cold["items"] if i["song_id"] not in mine["filtered"]]
    assert unheard[0] == sid(1) and order[0] == sid(11)  # the taste moved s011 from last to first
    assert sorted(order) == sorted(unheard)


def test_a_personal_cursor_is_bound_to_its_user(settings: Settings, store: RedisScoreStore) -> None:
    s = world(settings, store)
    listen(s, "u5", LIKED)
    with TestClient(app(s)) as client:
        cursor = page(client, {"limit": 5, "user": "u5"})["next_cursor"]
        for params in ({"user": "u6"}, {}):
            r = client.get("/v1/feeds/f", params={"limit": 5, "cursor": cursor, **params})
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "cursor_user_mismatch"
        assert client.get("/v1/feeds/f", params={"limit": 5, "cursor": cursor, "user": "u5"}).status_code == 200
        cold = page(client, {"limit": 5})["next_cursor"]  # a cold walk's cursor may turn personal
        assert client.get("/v1/feeds/f", params={"limit": 5, "cursor": cold, "user": "u5"}).status_code == 200


@pytest.mark.parametrize(
    ("window", "dedup", "limit", "at", "reuse"),
    [
        (200, None, 10, 0, False),  # the page's first song taken down
        (5, 0.97, 20, 12, False),  # one below the taste block, inside the near-duplicate check
        (200, 0.97, 10, 0, True),  # taken down, and its row given to a song the change log adds
    ],
)
def test_a_takedown_while_the_listener_is_read_never_serves_stale_rows(
    settings: Settings,
    store: RedisScoreStore,
    monkeypatch: pytest.MonkeyPatch,
    window: int,
    dedup: float | None,
    limit: int,
    at: int,
    reuse: bool,
) -> None:
    """A personal page reads its first range while the listener's state is on its way; a takedown (or the
    change log) run on the loop meanwhile frees rows that range holds. The page is the one the table gives
    after the write: never the removed song, a blank id, the song that took its row, nor a 500."""
    s = world(settings, store, plain(half_life_hours=None, dedup_threshold=dedup), window)
    listen(s, "u7", LIKED)
    params: dict[str, Any] = {"limit": limit, "user": "u7"}
    newcomer = "s900"
    newcomer_fields = store.read_fields([sid(N - 1)], TABLE_FIELDS)  # a real song's fields, under a new id
    with TestClient(app(s), raise_server_exceptions=False) as client:
        reader: FeedReader = client.app.state.reader  # type: ignore[attr-defined]
        table = reader.table
        victim = page(client, params)["items"][at]["song_id"]
        freed = table.row_of[victim]
        read = reader.listeners.listener

        async def listener(user: str, now: float) -> Listener:
            got = await read(user, now)  # a real round trip: the page has read ahead meanwhile
            reader.forget([victim])  # what DELETE /v1/songs/{id} does on the loop
            if reuse:  # what TableSync.apply does for a new song: the freed row is its
                table.upsert(SongBatch.from_fields([newcomer], newcomer_fields))
                table.feeds["f"].set(newcomer, -1e6)
                assert table.row_of[newcomer] == freed
            monkeypatch.setattr(reader.listeners, "listener", read)  # once
            return got

        monkeypatch.setattr(reader.listeners, "listener", listener)
        r = client.get("/v1/feeds/f", params=params)
        assert r.status_code == 200, r.text
        raced = r.json()
        calm = page(client, params)
    served = [i["song_id"] for i in raced["items"]]
    assert victim not in served and "" not in served and newcomer not in served
    assert len(served) == limit
    assert raced.pop("request_id") != calm.pop("request_id")  # each response its own id; the rest equal
    assert raced == calm


@pytest.mark.parametrize("user", ["", "x" * 129, "tab\there", "nul\x00"])
def test_a_bad_user_id_is_a_422(settings: Settings, store: RedisScoreStore, user: str) -> None:
    s = world(settings, store)
    with TestClient(app(s)) as client:
        r = client.get("/v1/feeds/f", params={"user": user})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "bad_user"
        r = client.post("/v1/rank", json={"candidates": [sid(0)], "feed": "f", "user": user})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "bad_user"


def test_a_user_id_with_a_lone_surrogate_is_a_422_not_a_500(settings: Settings, store: RedisScoreStore) -> None:
    """Valid JSON (an escaped lone surrogate), but no UTF-8 key can be made of it: refused like any bad id."""
    s = world(settings, store)
    body = b'{"candidates": ["%s"], "feed": "f", "user": "a\\ud800"}' % sid(0).encode()
    with TestClient(app(s)) as client:
        r = client.post("/v1/rank", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "bad_user"


class Via(httpx.BaseTransport):
    """The client's requests, sent through a running TestClient (the app's lifespan included)."""

    def __init__(self, served: TestClient) -> None:
        self.served = served

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.served.request(
            request.method, request.url.raw_path.decode(), content=request.read(), headers=dict(request.headers)
        )
        return httpx.Response(r.status_code, headers={"content-type": "application/json"}, content=r.content)


def test_the_client_passes_the_user(settings: Settings, store: RedisScoreStore) -> None:
    """``user`` on the client's feed, iter_feed and rank reaches the API (the shared Call builders)."""
    s = world(settings, store)
    listen(s, "u7", LIKED, plays=[0])
    heard = {sid(i) for i in [0, *LIKED]}
    with TestClient(app(s)) as served, ApexRankClient("http://testserver", transport=Via(served)) as client:
        first = client.feed("f", limit=5, user="u7")
        walked = [song.song_id for song in client.iter_feed("f", limit=7, user="u7")]
        ranked = client.rank([sid(i) for i in range(12)], feed="f", user="u7")
    assert all("taste" in song.components for song in first.items)
    assert sorted(walked) == sorted({sid(i) for i in range(N)} - heard)
    assert set(ranked.filtered) == heard


def test_a_listener_is_served_the_cold_start_answer_while_their_state_is_unreadable(
    stack: EmbeddedStack, settings: Settings, store: RedisScoreStore
) -> None:
    """The song table carries pages through a Redis outage; a listener's page and rerank, whose state
    lives in Redis, get the cold-start answer marked ``listener_state: unavailable``, not a 503."""
    s = with_feeds(settings, {"f": plain(half_life_hours=None)})
    s = s.model_copy(update={"api": ApiSettings(calibration_ttl_s=0, table_poll_s=0.1, served_log=False)})
    FeedWriter(s, store).on_scored([record("a", likes=10), record("b", likes=20)], now=NOW)
    add_vectors(s, {"a": np.ones(DIM), "b": -np.ones(DIM)})
    listeners = stores.listener_store(s)
    listeners.record([ListenerEvent("e1", "u1", "b", "play", time.time())], {})  # u1 has heard b
    listeners.close()
    rank = {"candidates": ["a", "b"], "user": "u1"}
    with TestClient(create_app(s)) as client:
        mine = client.get("/v1/feeds/f", params={"user": "u1"}).json()
        assert [i["song_id"] for i in mine["items"]] == ["a"] and "listener_state" not in mine
        ranked = client.post("/v1/rank", json=rank).json()
        assert ranked["filtered"] == ["b"] and "listener_state" not in ranked
        stack.stop_one("redis")
        try:
            page = client.get("/v1/feeds/f", params={"user": "u1"})
            assert page.status_code == 200 and page.json()["listener_state"] == "unavailable"
            assert [i["song_id"] for i in page.json()["items"]] == ["b", "a"]  # the cold-start page
            ranked = client.post("/v1/rank", json=rank)
            assert ranked.status_code == 200 and ranked.json()["listener_state"] == "unavailable"
            assert [i["song_id"] for i in ranked.json()["items"]] == ["b", "a"] and ranked.json()["filtered"] == []
            line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("apexrank_api_listener_"))
            assert line == "apexrank_api_listener_unavailable_total 2.0"
        finally:
            stack.up()
