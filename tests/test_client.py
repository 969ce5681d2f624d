"""ApexRankClient against real uvicorn servers on free loopback ports."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from consumers.stack import free_port
from indexes import RedisScoreStore, RedisStoreConfig
from ranker.serving.api import create_app
from ranker.serving.client import ApexRankClient, ApexRankError, AsyncApexRankClient
from ranker.serving.writer import FeedWriter
from ranker.settings import Settings
from tests.test_api import DIM, add_vectors, unit
from tests.test_policy import NOW, plain, record, with_feeds


class Served:
    """A uvicorn server in a thread (started with :meth:`start`, stopped with :meth:`stop`)."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 15
        while wait and not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def song_vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"s{i}": rng.standard_normal(DIM) for i in range(12)}


def expected_similar(song_id: str, k: int) -> list[tuple[str, float]]:
    """The k songs nearest ``song_id`` by the cosine of the vectors the fixture stored (unit float32)."""
    stored = {sid: unit(v).astype(np.float64) for sid, v in song_vectors().items()}
    query = stored[song_id]
    sims = sorted(((sid, float(v @ query)) for sid, v in stored.items() if sid != song_id), key=lambda h: -h[1])
    return sims[:k]


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[Served, Settings]]:
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibrate=False)
    store = RedisScoreStore(RedisStoreConfig(url=s.redis.url.get_secret_value(), key_prefix=s.redis.key_prefix))
    FeedWriter(s, store).on_scored([record(f"s{i}", likes=90 - i) for i in range(12)], now=NOW)
    store.close()
    add_vectors(s, song_vectors())
    served = Served(create_app(s), free_port()).start()
    yield served, s
    served.stop()


def test_client_calls_every_endpoint(api: tuple[Served, Settings]) -> None:
    served, _ = api
    with ApexRankClient(served.url, timeout_s=5) as client:
        assert client.ready()
        page = client.feed("f", limit=5)
        assert [i.song_id for i in page.items] == [f"s{i}" for i in range(5)] and page.next_cursor
        assert page.items[0].components["quality"] > 0
        assert [i.song_id for i in client.iter_feed("f", limit=5)] == [f"s{i}" for i in range(12)]
        ranked = client.rank(["s3", "ghost", "s1"])
        assert [i.song_id for i in ranked.items] == ["s1", "s3"] and ranked.unknown == ["ghost"]
        assert client.rank(["s3", "s1"], weights={"coherence": 1.0}).feed == "f"
        assert client.song("s2")["scores"]["likes"] == 88.0
        for song_id in ("s0", "s7"):
            similar = client.similar(song_id, k=3)
            want = expected_similar(song_id, 3)
            assert [s.song_id for s in similar] == [sid for sid, _ in want]
            for got, (_, cosine) in zip(similar, want, strict=True):
                assert got.similarity == pytest.approx(cosine, abs=1e-5)  # FAISS works in float32
        t0 = time.monotonic()
        with pytest.raises(ApexRankError) as err:
            ApexRankClient(served.url, backoff_s=2.0).feed("no-such-feed")  # a retry would wait >= 1 s
        assert err.value.status == 404 and err.value.code == "unknown_feed"
        assert time.monotonic() - t0 < 1.0  # a 4xx is not retried
        with pytest.raises(ApexRankError) as err:
            client.similar("s0", k=0)
        assert err.value.status == 422 and "k" in err.value.message


def test_client_token(settings: Settings) -> None:
    from ranker.settings import ApiSettings

    s = settings.model_copy(update={"api": ApiSettings(tokens=["t0k3n"])})  # type: ignore[list-item]
    served = Served(create_app(s), free_port()).start()
    try:
        with pytest.raises(ApexRankError) as err:
            ApexRankClient(served.url).feed("cold-start")
        assert err.value.status == 401
        assert ApexRankClient(served.url, token="t0k3n").feed("cold-start").items == []
    finally:
        served.stop()


def test_client_retries_until_the_server_is_up(settings: Settings) -> None:
    port = free_port()
    served = Served(create_app(settings), port)
    timer = threading.Timer(0.6, served.start, kwargs={"wait": False})
    timer.start()
    try:
        client = ApexRankClient(served.url, retries=40, backoff_s=0.1, max_backoff_s=0.5)  # >= 10 s: a loaded CI box
        t0 = time.monotonic()
        assert client.feed("cold-start").items == []  # connection refused at first, then served
        assert time.monotonic() - t0 >= 0.5
        client.close()
    finally:
        timer.join()
        while not served.server.started:
            time.sleep(0.02)
        served.stop()


def flaky_app(failures: int, calls: list[float]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/feeds/{feed}")
    async def feed(feed: str) -> JSONResponse:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            return JSONResponse({"error": "store_unavailable", "message": "Redis down"}, status_code=503)
        return JSONResponse({"feed": feed, "items": [], "next_cursor": None})

    @app.get("/slow")
    async def slow() -> JSONResponse:
        calls.append(time.monotonic())
        await asyncio.sleep(2)
        return JSONResponse({})

    return app


def test_client_retries_5xx_with_backoff() -> None:
    calls: list[float] = []
    served = Served(flaky_app(2, calls), free_port()).start()
    try:
        client = ApexRankClient(served.url, retries=3, backoff_s=0.1)
        assert client.feed("x").items == []
        assert len(calls) == 3
        gaps = np.diff(calls)
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # 0.1 then 0.2 s, jittered to 50-100%
        calls.clear()
        with pytest.raises(ApexRankError) as err:
            ApexRankClient(served.url, retries=1, backoff_s=0.01).feed("x")
        assert err.value.status == 503 and err.value.code == "store_unavailable" and len(calls) == 2
    finally:
        served.stop()


def test_client_times_out_and_gives_up() -> None:
    calls: list[float] = []
    served = Served(flaky_app(0, calls), free_port()).start()
    try:
        client = ApexRankClient(served.url, timeout_s=0.2, retries=1, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(ApexRankError) as err:
            client._request("GET", "/slow")
        assert err.value.status == 0 and err.value.code == "unreachable"
        assert len(calls) == 2 and time.monotonic() - t0 < 3.0
    finally:
        served.stop()


class Paced(ApexRankClient):
    """An ApexRankClient that records the waits between its attempts instead of taking them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []

    def _pause(self, delay_s: float) -> None:
        self.waits.append(delay_s)


def busy_app(calls: list[str]) -> FastAPI:
    """A feed answering 503 with Retry-After: 3, then 429 with Retry-After: 60, then a page; and an events
    endpoint failing its first batch with the API's 503 (Retry-After: 5) and accepting the next."""
    app = FastAPI()

    @app.get("/v1/feeds/{feed}")
    async def feed(feed: str) -> JSONResponse:
        calls.append("feed")
        busy = {1: (503, "3"), 2: (429, "60")}.get(calls.count("feed"))
        if busy:
            return JSONResponse({"error": "busy", "message": ""}, status_code=busy[0], headers={"Retry-After": busy[1]})
        return JSONResponse({"feed": feed, "items": [], "next_cursor": None})

    @app.post("/v1/events")
    async def events(request: Request) -> JSONResponse:
        calls.append("events")
        sent = (await request.json())["events"]
        first = calls.count("events") == 1
        results = [
            {"index": n, "event_id": e["event_id"], "status": "failed" if first else "accepted"}
            for n, e in enumerate(sent)
        ]
        if first:
            return JSONResponse(
                {"results": results, "error": "events_not_published"}, status_code=503, headers={"Retry-After": "5"}
            )
        return JSONResponse({"results": results}, status_code=202)

    return app


def test_client_waits_what_retry_after_asks_up_to_its_cap() -> None:
    """The API's 503s ask for a wait (events: 5 s); retrying sooner meets the same outage. A 429 is
    retried too, its Retry-After capped at max_retry_after_s (10 s)."""
    calls: list[str] = []
    served = Served(busy_app(calls), free_port()).start()
    try:
        with Paced(served.url, retries=3, backoff_s=0.01) as client:
            assert client.feed("x").items == []
            assert calls == ["feed"] * 3
            assert client.waits == [3.0, 10.0]  # not the 10-20 ms backoff
            client.waits.clear()
            got = client.send_events([{"event_id": "e-1", "song_id": "s", "user_id": "u", "type": "play"}])
            assert calls[3:] == ["events"] * 2 and client.waits == [5.0]
            assert [r.status for r in got.results] == ["accepted"]
        with Paced(served.url, retries=1, backoff_s=0.01, max_retry_after_s=0.5) as client:
            calls.clear()
            with pytest.raises(ApexRankError) as err:
                client.feed("x")
            assert err.value.status == 429 and client.waits == [0.5]  # 3 s asked, 0.5 s allowed
    finally:
        served.stop()


def test_a_retry_after_that_is_not_ascii_digits_is_ignored_not_a_crash() -> None:
    """ "²".isdigit() is True and float("²") raises: a proxy's odd header must leave the usual backoff."""
    from ranker.retry_after import retry_after_s

    def asked(value: str) -> float | None:  # the header's bytes as a proxy sends them (latin-1)
        return retry_after_s(
            httpx.Response(503, headers={"Retry-After": value.encode("latin-1")}).headers["retry-after"]
        )

    assert asked("7") == 7.0
    assert asked("\xb2") is None and asked("soon") is None  # "²"


def test_song_ids_of_dots_reach_their_own_song(settings: Settings) -> None:
    """ "." and ".." are valid song ids, and a URL's dot segments collapse: song("..") asked for /v1
    and similar(".") for /v1/songs/similar, the song named "similar". Sent escaped, they are these songs."""
    ids = [".", "..", "similar", "a..b", "s:1"]
    rng = np.random.default_rng(2)
    vectors = {sid: rng.standard_normal(DIM) for sid in ids}
    s = with_feeds(settings, {"f": plain(half_life_hours=None)}, calibrate=False)
    store = RedisScoreStore(RedisStoreConfig(url=s.redis.url.get_secret_value(), key_prefix=s.redis.key_prefix))
    FeedWriter(s, store).on_scored([record(sid, likes=10 + n) for n, sid in enumerate(ids)], now=NOW)
    store.close()
    add_vectors(s, vectors)
    served = Served(create_app(s), free_port()).start()

    def nearest(song_id: str) -> list[str]:
        stored = {sid: unit(v).astype(np.float64) for sid, v in vectors.items()}
        return sorted((sid for sid in ids if sid != song_id), key=lambda sid: -float(stored[sid] @ stored[song_id]))

    async def async_answers() -> list[tuple[float, list[str]]]:
        async with AsyncApexRankClient(served.url, timeout_s=5) as client:
            return [
                ((await client.song(sid))["scores"]["likes"], [x.song_id for x in await client.similar(sid, k=4)])
                for sid in ids
            ]

    try:
        with ApexRankClient(served.url, timeout_s=5) as client:
            sync = [(client.song(sid)["scores"]["likes"], [x.song_id for x in client.similar(sid, k=4)]) for sid in ids]
        want = [(10.0 + n, nearest(sid)) for n, sid in enumerate(ids)]
        assert sync == want
        assert asyncio.run(async_answers()) == want
    finally:
        served.stop()
