"""The HTTP API through FastAPI's TestClient, on the real Redis and a real FAISS index directory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from indexes import EmbeddingIndex, EmbeddingRecord, RedisScoreStore
from ranker.serving.api import create_app
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, FeedFilters, Settings
from tests.test_policy import NOW, plain, record, with_feeds

DIM = 16


#: The admin token the tests that reload the index configure (POST /v1/index/reload is an admin action).
ADMIN = "admin-token-1"


def with_admin(settings: Settings) -> Settings:
    return settings.model_copy(update={"api": settings.api.model_copy(update={"admin_tokens": [SecretStr(ADMIN)]})})


def reload_index(client: TestClient) -> dict[str, Any]:
    r = client.post("/v1/index/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def add_vectors(settings: Settings, vectors: dict[str, np.ndarray]) -> None:
    """Write embeddings the way the worker does (durable store + FAISS snapshot)."""
    index = EmbeddingIndex(settings.index_dir, dim=DIM, factory="Flat", use_gpu="never")
    try:
        index.add(
            [
                EmbeddingRecord(sid, "test-enc", np.zeros((1, DIM), np.float32), unit(v), 1, 1)
                for sid, v in vectors.items()
            ]
        )
    finally:
        index.close()


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def ids(items: list[dict[str, object]]) -> list[str]:
    return [str(i["song_id"]) for i in items]


def walk(client: TestClient, feed: str, limit: int, max_pages: int = 100) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    for _ in range(max_pages):
        params: dict[str, object] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        r = client.get(f"/v1/feeds/{feed}", params=params)
        assert r.status_code == 200, r.text
        pages.append(ids(r.json()["items"]))
        cursor = r.json()["next_cursor"]
        if not cursor:
            return pages
    raise AssertionError("the walk did not end")


def test_feed_page_follows_the_formula_and_explains_it(settings: Settings, store: RedisScoreStore) -> None:
    hand = plain(weights={"likes": 1.0, "coherence": 1.0}, half_life_hours=24, prior_strength=10)
    s = with_feeds(settings, {"hand": hand})
    FeedWriter(s, store).on_scored(
        [
            record("A", likes=50, coherence=5.0, age_h=0),
            record("B", likes=90, coherence=3.0, age_h=24),
            record("C", likes=10, coherence=1.0, age_h=1),
            record("D", likes=100, coherence=5.0, age_h=48),
        ],
        now=NOW,
    )
    with TestClient(create_app(s)) as client:
        body = client.get("/v1/feeds/hand", params={"limit": 10}).json()
    assert ids(body["items"]) == ["A", "B", "D", "C"] and body["next_cursor"] is None
    a = body["items"][0]
    assert a["score"] == pytest.approx(0.76, rel=1e-3)
    assert body["items"][1]["score"] == pytest.approx(0.355, rel=1e-3)
    assert body["items"][2]["score"] == pytest.approx(0.2525, rel=1e-3)
    c = a["components"]
    assert c["quality"] == pytest.approx(0.75) and c["freshness"] == pytest.approx(1.0, abs=1e-3)
    assert c["contributions"] == pytest.approx({"popularity": 0.25, "coherence": 0.5})
    assert c["prior_rate"] == pytest.approx(0.1275) and c["posterior_rate"] == pytest.approx(0.1275)
    assert (c["plays"], c["likes"], a["explore"]) == (0, 0, False)


def test_exploration_fills_the_configured_share(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"x": plain(explore_share=0.1, explore_pool=20, half_life_hours=None)}, calibrate=False)
    FeedWriter(s, store).on_scored([record(f"s{i:03d}", likes=100 - i * 0.5) for i in range(120)], now=NOW)
    with TestClient(create_app(s)) as client:
        body = client.get("/v1/feeds/x", params={"limit": 50}).json()
        items = body["items"]
        assert len(items) == 50
        explored = [n for n, item in enumerate(items) if item["explore"]]
        assert len(explored) == 5  # at random positions (tests/test_served_log.py: they vary)
        exploit = [i["song_id"] for i in items if not i["explore"]]
        assert exploit == [f"s{i:03d}" for i in range(45)]  # stored order
        for n in explored:
            picked = int(items[n]["song_id"][1:])
            assert 45 <= picked < 65  # from the pool just below the exploit slots
            assert 0 < items[n]["components"]["sampled_rate"] < 1
        pages = walk(client, "x", 50)
    seen = Counter(sid for page in pages for sid in page)
    assert len(seen) == 120 and set(seen.values()) == {1}  # explored songs are not served again


def test_near_duplicates_are_pushed_down(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"d": plain(dedup_threshold=0.95, half_life_hours=None)}, calibrate=False)
    songs = [f"s{i}" for i in range(6)]
    FeedWriter(s, store).on_scored([record(sid, likes=90 - 10 * i) for i, sid in enumerate(songs)], now=NOW)
    basis = np.eye(DIM, dtype=np.float32)
    vectors = {sid: basis[i] for i, sid in enumerate(songs)}
    vectors["s1"] = basis[0] + 0.05 * basis[1]  # cosine 0.9988 with s0
    vectors["s4"] = basis[2] + 0.2 * basis[4]  # cosine 0.98 with s2
    add_vectors(s, vectors)
    with TestClient(create_app(s)) as client:
        assert ids(client.get("/v1/feeds/d", params={"limit": 6}).json()["items"]) == [
            "s0", "s2", "s3", "s5", "s1", "s4"
        ]  # fmt: skip
        first = client.get("/v1/feeds/d", params={"limit": 3}).json()
        assert ids(first["items"]) == ["s0", "s2", "s3"]
        second = client.get("/v1/feeds/d", params={"limit": 3, "cursor": first["next_cursor"]}).json()
        assert ids(second["items"]) == ["s1", "s4", "s5"]  # s2, its near-duplicate, was on the last page
        assert second["next_cursor"] is None


def test_generator_cap_per_page(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"g": plain(max_per_generator=2, half_life_hours=None)}, calibrate=False)
    songs = [record(f"x{i}", likes=99 - i, generator="gen-x") for i in range(5)]
    songs += [record(f"y{i}", likes=80 - i, generator="gen-y") for i in range(3)]
    FeedWriter(s, store).on_scored(songs, now=NOW)
    with TestClient(create_app(s)) as client:
        assert ids(client.get("/v1/feeds/g", params={"limit": 4}).json()["items"]) == ["x0", "x1", "y0", "y1"]
        pages = walk(client, "g", 4)
    assert pages[1] == ["x2", "x3", "y2", "x4"]  # the cap gives way only when nothing else is left
    assert sorted(sid for p in pages for sid in p) == sorted(x.song_id for x in songs)


@pytest.mark.parametrize("explore", [0.0, 0.2])
def test_cursor_is_stable_while_songs_are_inserted(settings: Settings, store: RedisScoreStore, explore: float) -> None:
    policy = plain(explore_share=explore, explore_pool=5, half_life_hours=None, max_per_generator=3)
    s = with_feeds(settings, {"c": policy}, calibrate=False)
    writer = FeedWriter(s, store)
    gens = ["a", "b", "c"]
    original = [record(f"o{i:02d}", likes=95 - 3 * i, generator=gens[i % 3]) for i in range(30)]
    writer.on_scored(original, now=NOW)
    served: list[str] = []
    with TestClient(create_app(s)) as client:
        r = client.get("/v1/feeds/c", params={"limit": 7}).json()
        served += ids(r["items"])
        cursor = r["next_cursor"]
        # New songs land above, between and below the boundary while a client pages.
        writer.on_scored([record(f"n{i:02d}", likes=100 - 7 * i, generator=gens[i % 3]) for i in range(15)], now=NOW)
        while cursor:
            r = client.get("/v1/feeds/c", params={"limit": 7, "cursor": cursor}).json()
            served += ids(r["items"])
            cursor = r["next_cursor"]
    counts = Counter(served)
    assert all(n == 1 for n in counts.values()), "a song was served twice"
    assert {x.song_id for x in original} <= set(counts), "a song that existed at the first page was skipped"


def test_rank_orders_candidates_and_lists_unknown_ids(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibrate=False)
    FeedWriter(s, store).on_scored(
        [record("lo", likes=10), record("mid", likes=50), record("hi", likes=90, coherence=1.0)], now=NOW
    )
    with TestClient(create_app(s)) as client:
        r = client.post("/v1/rank", json={"candidates": ["lo", "ghost", "hi", "mid"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert ids(body["items"]) == ["hi", "mid", "lo"] and body["unknown"] == ["ghost"]
        assert body["feed"] == "f" and body["items"][0]["components"]["quality"] > 0
        inline = client.post("/v1/rank", json={"candidates": ["lo", "mid", "hi"], "weights": {"coherence": 1}})
        assert ids(inline.json()["items"])[-1] == "hi"  # coherence 1.0: last by aesthetics alone
        lean = client.post("/v1/rank", json={"candidates": ["lo", "hi"], "explain": False}).json()
        assert lean["items"] == [{"song_id": "hi", "score": body["items"][0]["score"]}, lean["items"][1]]
        assert "components" not in lean["items"][1]
        big = [f"u{i}" for i in range(500)]
        assert client.post("/v1/rank", json={"candidates": big}).json()["unknown"] == big


def test_rank_apply_filters(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(filters=FeedFilters(generators_exclude=["udio"]))})
    FeedWriter(s, store).on_scored([record("a"), record("b", generator="udio")], now=NOW)
    with TestClient(create_app(s)) as client:
        body = client.post("/v1/rank", json={"candidates": ["a", "b"], "apply_filters": True}).json()
    assert ids(body["items"]) == ["a"] and body["filtered"] == ["b"]


def test_song_and_similar(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"f": plain(prior_strength=20)}, calibrate=False)
    FeedWriter(s, store).on_scored([record(f"s{i}") for i in range(4)], now=NOW)
    store.client.hincrby(store.song_key("s0"), "eng.plays", 30)
    store.client.hincrby(store.song_key("s0"), "eng.likes", 6)
    store.client.hincrby(store.song_key("s0"), "eng.shares", 2)
    store.client.hincrby(store.song_key("engagement-only"), "eng.plays", 3)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(DIM)
    add_vectors(
        s, {"s0": base, "s1": base + 0.1 * rng.standard_normal(DIM), "s2": -base, "s3": rng.standard_normal(DIM)}
    )
    with TestClient(create_app(with_admin(s))) as client:
        song = client.get("/v1/songs/s0").json()
        assert song["model_version"] == "test-1" and song["scores"]["likes"] == 50.0
        assert song["engagement"] == {"plays": 30, "likes": 6, "skips": 0, "completes": 0, "shares": 2}
        feed = song["feeds"]["f"]
        assert feed["posterior_rate"] == pytest.approx((20 * 0.1275 + 6) / 50)
        assert feed["beta"] == pytest.approx([20 * 0.1275 + 6, 20 * 0.8725 + 24])
        assert song["like_rate"]["source"] == "fallback"
        assert song["like_rate"]["spread"] is None and song["like_rate"]["ood"] is False
        assert feed["prior_strength"] == 20
        # an ensemble's spread and an OOD flag (issue 17): the song's own w, in the posterior and its Beta
        store.client.hset(store.song_key("s0"), mapping={"prior.like_rate_sd": "0.1", "ood": "1", "ood.pct": "99.5"})
        uncertain = client.get("/v1/songs/s0").json()
        w = 0.25 * (0.1275 * 0.8725 / 0.01 - 1)  # Policy.strength: the spread's w, times ood_prior_factor
        assert uncertain["like_rate"] | {"calibration_scale": 1.0} == song["like_rate"] | {
            "spread": 0.1,
            "ood": True,
            "ood_percentile": 99.5,
        }
        assert uncertain["feeds"]["f"]["prior_strength"] == pytest.approx(w)
        assert uncertain["feeds"]["f"]["posterior_rate"] == pytest.approx((w * 0.1275 + 6) / (w + 30))
        assert client.get("/v1/songs/engagement-only").status_code == 404
        hits = client.get("/v1/songs/s0/similar", params={"k": 2}).json()["items"]
        assert hits[0]["song_id"] == "s1" and len(hits) == 2
        assert hits[0]["similarity"] > 0.9 and hits[0]["similarity"] > hits[1]["similarity"]
        # a song indexed after start-up shows up in results after a reload (or the periodic refresh)
        add_vectors(s, {"late": base})
        assert client.get("/v1/songs/s0/similar", params={"k": 1}).json()["items"][0]["song_id"] == "s1"
        assert reload_index(client)["vectors"] == 5
        top = client.get("/v1/songs/s0/similar", params={"k": 1}).json()["items"][0]
        assert top["song_id"] == "late" and top["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_probes_metrics_and_openapi(settings: Settings, store: RedisScoreStore) -> None:
    with TestClient(create_app(with_admin(settings))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is True  # no index yet
        add_vectors(settings, {"v": np.ones(DIM)})
        reload_index(client)
        assert client.get("/readyz").status_code == 200
        client.get("/v1/feeds/cold-start")
        metrics = client.get("/metrics").text
        assert 'apexrank_api_requests_total{method="GET",route="/v1/feeds/{feed}",status="200"}' in metrics
        spec = client.get("/openapi.json").json()
        assert {"/v1/feeds/{feed}", "/v1/rank", "/v1/songs/{song_id}", "/v1/songs/{song_id}/similar"} <= set(
            spec["paths"]
        )


BAD_REQUESTS = [
    ("GET", "/v1/feeds/no-such-feed", None, 404),
    ("GET", "/v1/feeds/cold-start?limit=0", None, 422),
    ("GET", "/v1/feeds/cold-start?limit=201", None, 422),
    ("GET", "/v1/feeds/cold-start?limit=ten", None, 422),
    ("GET", "/v1/feeds/cold-start?cursor=not-a-cursor", None, 400),
    ("GET", "/v1/songs/bad%7Bid%7D", None, 422),
    ("GET", "/v1/songs/" + "x" * 129, None, 422),
    ("GET", "/v1/songs/no-such-song", None, 404),
    ("GET", "/v1/songs/a/similar?k=0", None, 422),
    ("GET", "/v1/songs/a/similar?k=101", None, 422),
    ("GET", "/v1/songs/no-such-song/similar", None, 404),
    ("POST", "/v1/rank", {"candidates": []}, 422),
    ("POST", "/v1/rank", {"candidates": [f"s{i}" for i in range(501)]}, 422),
    ("POST", "/v1/rank", {"candidates": ["ok", "bad id"]}, 422),
    ("POST", "/v1/rank", {"candidates": ["a", "a"]}, 422),
    ("POST", "/v1/rank", {"candidates": ["a"], "feed": "no-such-feed"}, 404),
    ("POST", "/v1/rank", {"candidates": ["a"], "weights": {"vibes": 1}}, 422),
    ("POST", "/v1/rank", {"candidates": ["a"], "weights": {"likes": -1}}, 422),
    ("POST", "/v1/rank", {"candidates": ["a"], "prior_strength": 0}, 422),
    ("POST", "/v1/rank", {"candidates": ["a"], "surprise": 1}, 422),
    ("POST", "/v1/rank", "not json", 422),
    ("DELETE", "/v1/rank", None, 405),
]


@pytest.mark.parametrize(("method", "url", "body", "status"), BAD_REQUESTS)
def test_invalid_requests_get_a_4xx_with_a_message(
    settings: Settings, method: str, url: str, body: object, status: int
) -> None:
    add_vectors(settings, {"a": np.ones(DIM)})
    with TestClient(create_app(settings), raise_server_exceptions=True) as client:
        if isinstance(body, str):
            r = client.request(method, url, content=body, headers={"content-type": "application/json"})
        else:
            r = client.request(method, url, json=body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["message"] and payload["error"]


def test_cursor_of_another_feed_is_rejected(settings: Settings, store: RedisScoreStore) -> None:
    s = with_feeds(settings, {"one": plain(), "two": plain()})
    FeedWriter(s, store).on_scored([record(f"s{i}") for i in range(5)], now=NOW)
    with TestClient(create_app(s)) as client:
        cursor = client.get("/v1/feeds/one", params={"limit": 2}).json()["next_cursor"]
        r = client.get("/v1/feeds/two", params={"cursor": cursor})
    assert r.status_code == 400 and "another feed" in r.json()["message"]


def test_body_size_limit(settings: Settings) -> None:
    s = settings.model_copy(update={"api": ApiSettings(max_body_bytes=2048)})
    with TestClient(create_app(s)) as client:
        big = {"candidates": [f"song-{i:05d}" for i in range(400)]}
        r = client.post("/v1/rank", json=big)
        assert r.status_code == 413 and "2048" in r.json()["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"candidates": ["' + b"a" * 1500
            yield b"a" * 1500 + b'"]}'

        r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_reloads_asked_for_during_a_reload_share_the_next_one() -> None:
    """POST /v1/index/reload's coalescing: twelve calls while a reload runs cost one more reload, and
    each call is answered by a reload that began after it was made."""
    import asyncio
    import threading

    from ranker.serving.coalesce import Coalesced

    runs: list[int] = []
    release = threading.Event()

    def load() -> int:
        runs.append(len(runs))
        if len(runs) == 1:
            release.wait(10)  # the first reload is slow: the burst arrives while it runs
        return len(runs)

    async def burst() -> tuple[int, list[int], int]:
        reload = Coalesced(load)
        first = asyncio.ensure_future(reload())
        while not runs:
            await asyncio.sleep(0.001)
        during = [asyncio.ensure_future(reload()) for _ in range(12)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(*during)
        return await first, answers, await reload()

    first, during, after = asyncio.run(burst())
    assert (first, during, after) == (1, [2] * 12, 3) and len(runs) == 3


def test_bearer_tokens(settings: Settings) -> None:
    s = settings.model_copy(update={"api": ApiSettings(tokens=["s3cret", "other"])})  # type: ignore[list-item]
    with TestClient(create_app(s)) as client:
        assert client.get("/v1/feeds/cold-start").status_code == 401
        wrong = client.get("/v1/feeds/cold-start", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"] == "unauthorized"
        for token in ("s3cret", "other"):
            ok = client.get("/v1/feeds/cold-start", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        assert client.post("/v1/rank", json={"candidates": ["a"]}).status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        # Reloading the index is an admin action: a read token is not enough, and with no admin token
        # configured nobody may (the index catches up every api.index_refresh_s by itself).
        r = client.post("/v1/index/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 403 and r.json()["error"] == "reload_disabled"
    with TestClient(create_app(with_admin(s))) as client:
        for creds in ({}, {"Authorization": "Bearer s3cret"}):
            r = client.post("/v1/index/reload", headers=creds)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", creds
        assert reload_index(client)["ready"] is False  # no index written yet: answered, not refused


@pytest.mark.parametrize("cluster", [False, True])
def test_redis_down_is_a_503(settings: Settings, cluster: bool) -> None:
    """A single node refusing connections, or a Redis Cluster none of whose nodes answers (redis-py
    raises RedisClusterException there, not a ConnectionError)."""
    from consumers.stack import free_port
    from ranker.settings import RedisSettings

    url = (
        f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
        if cluster
        else f"redis://127.0.0.1:{free_port()}/0"
    )
    s = settings.model_copy(
        update={"redis": RedisSettings(url=url, socket_timeout_s=0.5)}  # type: ignore[arg-type]
    )
    with TestClient(create_app(s)) as client:
        for path in ("/v1/feeds/cold-start", "/v1/songs/abc"):
            r = client.get(path)
            assert r.status_code == 503 and r.json()["error"] == "store_unavailable", (path, r.text)
        assert client.get("/readyz").status_code == 503
