"""AsyncApexRankClient against real uvicorn servers (the API over the session's Redis) and a
connection-counting HTTP server, all on free loopback ports; each test drives its coroutines with
``asyncio.run`` (no async test plugin)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from consumers.stack import free_port
from ranker.serving.client import (
    ApexRankClient,
    ApexRankError,
    AsyncApexRankClient,
    FeedPage,
    RankedSong,
    RankResult,
)
from ranker.settings import Settings
from tests import test_client
from tests.helpers import CountingHTTPServer, serving
from tests.test_client import Served

api = test_client.api  # the fixture: the API over the session's Redis, feed "f" holding s0-s11

Outcome = tuple[int, str, str]  # an ApexRankError's status, code, message


def sync_error(call: Callable[[], object]) -> Outcome:
    with pytest.raises(ApexRankError) as err:
        call()
    return err.value.status, err.value.code, err.value.message


async def async_error(call: Awaitable[object]) -> Outcome:
    with pytest.raises(ApexRankError) as err:
        await call
    return err.value.status, err.value.code, err.value.message


def sync_results(client: ApexRankClient) -> dict[str, Any]:
    first = client.feed("f", limit=5)
    return {
        "ready": client.ready(),
        "first": first,
        "second": client.feed("f", limit=5, cursor=first.next_cursor),
        "all": list(client.iter_feed("f", limit=5)),
        "two pages": list(client.iter_feed("f", limit=4, max_pages=2)),
        "rank": client.rank(["s3", "ghost", "s1", "nope"]),
        "rank weighted": client.rank(["s5", "s2", "s9"], feed="f", weights={"coherence": 1.0}, apply_filters=True),
        "song": client.song("s2"),
        "similar": client.similar("s0", k=3),
        "similar default": client.similar("s7"),
        "unknown feed": sync_error(lambda: client.feed("no-such-feed")),
        "unknown song": sync_error(lambda: client.song("ghost")),
        "bad k": sync_error(lambda: client.similar("s0", k=0)),
    }


async def async_results(client: AsyncApexRankClient) -> dict[str, Any]:
    first = await client.feed("f", limit=5)
    return {
        "ready": await client.ready(),
        "first": first,
        "second": await client.feed("f", limit=5, cursor=first.next_cursor),
        "all": [song async for song in client.iter_feed("f", limit=5)],
        "two pages": [song async for song in client.iter_feed("f", limit=4, max_pages=2)],
        "rank": await client.rank(["s3", "ghost", "s1", "nope"]),
        "rank weighted": await client.rank(
            ["s5", "s2", "s9"], feed="f", weights={"coherence": 1.0}, apply_filters=True
        ),
        "song": await client.song("s2"),
        "similar": await client.similar("s0", k=3),
        "similar default": await client.similar("s7"),
        "unknown feed": await async_error(client.feed("no-such-feed")),
        "unknown song": await async_error(client.song("ghost")),
        "bad k": await async_error(client.similar("s0", k=0)),
    }


def timeless(value: Any) -> Any:
    """``value`` with every song's ``age_hours`` component (measured from the clock at each request) and each
    response's own ``request_id`` left out (a fresh 32-hex id is checked for)."""
    if isinstance(value, RankedSong):
        assert value.components.get("age_hours", -1.0) >= 0
        return replace(value, components={k: v for k, v in value.components.items() if k != "age_hours"})
    if isinstance(value, FeedPage | RankResult):
        assert value.request_id is not None and len(value.request_id) == 32
        return replace(value, items=timeless(value.items), request_id=None)
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items()}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def test_async_client_returns_what_the_sync_client_does(api: tuple[Served, Settings]) -> None:
    served, _ = api  # feed "f": no exploration, no decay, so every page is the same each time
    with ApexRankClient(served.url, timeout_s=5) as client:
        want = sync_results(client)

    async def run() -> dict[str, Any]:
        async with AsyncApexRankClient(served.url, timeout_s=5) as client:
            return await async_results(client)

    got = asyncio.run(run())
    assert timeless(got) == timeless(want)  # the same dataclasses, field for field
    # ...and they are the real answers, not two identical failures
    assert want["ready"] is True
    assert [s.song_id for s in want["first"].items] == [f"s{i}" for i in range(5)] and want["first"].next_cursor
    assert [s.song_id for s in want["second"].items] == [f"s{i}" for i in range(5, 10)]
    assert [s.song_id for s in want["all"]] == [f"s{i}" for i in range(12)]
    assert [s.song_id for s in want["two pages"]] == [f"s{i}" for i in range(8)]
    assert [s.song_id for s in want["rank"].items] == ["s1", "s3"] and want["rank"].unknown == ["ghost", "nope"]
    assert [s.song_id for s in want["rank weighted"].items] and want["rank weighted"].feed == "f"
    assert want["song"]["scores"]["likes"] == 88.0
    assert len(want["similar"]) == 3 and len(want["similar default"]) == 10
    assert want["unknown feed"][:2] == (404, "unknown_feed") and want["bad k"][0] == 422
    assert want["unknown song"][0] == 404


def _parameters(fn: Callable[..., object], skip_annotation: str = "") -> list[tuple[object, ...]]:
    return [
        (p.name, p.kind, p.default, None if p.name == skip_annotation else p.annotation)
        for p in inspect.signature(fn).parameters.values()
    ]


def test_async_client_has_every_sync_method_with_the_same_signature() -> None:
    public = {name for name, value in vars(ApexRankClient).items() if callable(value) and not name.startswith("_")}
    assert public == {"feed", "iter_feed", "rank", "song", "similar", "ready", "close", "send_events"}
    for name in public:
        sync_fn, async_fn = getattr(ApexRankClient, name), getattr(AsyncApexRankClient, name)
        assert inspect.iscoroutinefunction(async_fn) or inspect.isasyncgenfunction(async_fn), name
        assert _parameters(async_fn) == _parameters(sync_fn), name
        sync_return = inspect.signature(sync_fn).return_annotation
        want = f"Async{sync_return}" if name == "iter_feed" else sync_return
        assert inspect.signature(async_fn).return_annotation == want, name
    # The constructors differ only in the type of the (test) transport.
    assert _parameters(AsyncApexRankClient, "transport") == _parameters(ApexRankClient, "transport")


# -- retries ----------------------------------------------------------------------------------------
def flaky_app(failures: int, calls: list[tuple[str, float]]) -> FastAPI:
    """Feed "missing" is unknown (404); any other feed answers 503 ``failures`` times, then 200."""
    app = FastAPI()

    @app.get("/v1/feeds/{feed}")
    async def feed(feed: str) -> JSONResponse:
        calls.append((feed, time.monotonic()))
        if feed == "missing":
            return JSONResponse({"error": "unknown_feed", "message": "no feed 'missing'"}, status_code=404)
        if sum(f == feed for f, _ in calls) <= failures:
            return JSONResponse({"error": "store_unavailable", "message": "Redis down"}, status_code=503)
        return JSONResponse({"feed": feed, "items": [{"song_id": "a", "score": 1.5}], "next_cursor": None})

    @app.get("/slow")
    async def slow() -> JSONResponse:
        calls.append(("slow", time.monotonic()))
        await asyncio.sleep(2)
        return JSONResponse({})

    return app


def test_async_client_retries_5xx_and_raises_other_errors_at_once() -> None:
    calls: list[tuple[str, float]] = []
    served = Served(flaky_app(2, calls), free_port()).start()

    async def run() -> None:
        async with AsyncApexRankClient(served.url, retries=3, backoff_s=0.1) as client:
            page = await client.feed("x")  # 503, 503, then 200
            assert [s.song_id for s in page.items] == ["a"] and page.items[0].score == 1.5
            gaps = np.diff([t for _, t in calls])
            assert len(calls) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.1  # 0.1 then 0.2 s, jittered to 50-100%
            calls.clear()
        async with AsyncApexRankClient(served.url, retries=3, backoff_s=2.0) as client:
            t0 = time.monotonic()
            with pytest.raises(ApexRankError) as err:
                await client.feed("missing")  # a retry would wait >= 1 s
            assert (err.value.status, err.value.code, err.value.message) == (404, "unknown_feed", "no feed 'missing'")
            assert len(calls) == 1 and time.monotonic() - t0 < 1.0
            calls.clear()
        async with AsyncApexRankClient(served.url, retries=1, backoff_s=0.01) as client:
            with pytest.raises(ApexRankError) as err:
                await client.feed("y")  # still failing after its one retry
            assert err.value.status == 503 and err.value.code == "store_unavailable" and len(calls) == 2

    try:
        asyncio.run(run())
    finally:
        served.stop()


def test_async_client_times_out_and_gives_up() -> None:
    calls: list[tuple[str, float]] = []
    served = Served(flaky_app(0, calls), free_port()).start()

    async def run() -> None:
        async with AsyncApexRankClient(served.url, timeout_s=0.2, retries=1, backoff_s=0.01) as client:
            t0 = time.monotonic()
            with pytest.raises(ApexRankError) as err:
                await client._request("GET", "/slow")
            assert err.value.status == 0 and err.value.code == "unreachable"
            assert len(calls) == 2 and time.monotonic() - t0 < 3.0
        async with AsyncApexRankClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as client:
            with pytest.raises(ApexRankError) as err:
                await client.song("s1")  # nothing listens there: refused three times
            assert err.value.status == 0 and err.value.code == "unreachable" and "ConnectError" in err.value.message

    try:
        asyncio.run(run())
    finally:
        served.stop()


class _PacedAsync(AsyncApexRankClient):
    """An AsyncApexRankClient that records the waits between its attempts instead of taking them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []

    async def _pause(self, delay_s: float) -> None:
        self.waits.append(delay_s)


def test_async_client_waits_what_retry_after_asks_up_to_its_cap() -> None:
    """As the sync client: 503 Retry-After: 3, then 429 Retry-After: 60 (capped at 10 s), then the
    events' 503 Retry-After: 5 (test_client.busy_app)."""
    calls: list[str] = []
    served = Served(test_client.busy_app(calls), free_port()).start()

    async def run() -> None:
        async with _PacedAsync(served.url, retries=3, backoff_s=0.01) as client:
            assert (await client.feed("x")).items == []
            assert calls == ["feed"] * 3 and client.waits == [3.0, 10.0]
            client.waits.clear()
            got = await client.send_events([{"event_id": "e-1", "song_id": "s", "user_id": "u", "type": "play"}])
            assert calls[3:] == ["events"] * 2 and client.waits == [5.0]
            assert [r.status for r in got.results] == ["accepted"]

    try:
        asyncio.run(run())
    finally:
        served.stop()


# -- connection sharing ---------------------------------------------------------------------------------
class _CountingServer(CountingHTTPServer):
    """Counts the TCP connections it accepts and the requests it serves; the next ``fail_next``
    requests get a 503."""

    def __init__(self) -> None:
        super().__init__(_SongHandler)
        self.requests = 0
        self.fail_next = 0


class _SongHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a connection serves request after request
    server: _CountingServer

    def do_GET(self) -> None:
        self.server.requests += 1
        status, body = 404, {"error": "not_found", "message": self.path}
        if self.server.fail_next:
            self.server.fail_next -= 1
            status, body = 503, {"error": "store_unavailable", "message": "Redis down"}
        elif self.path.startswith("/v1/songs/"):
            status, body = 200, {"song_id": self.path.rsplit("/", 1)[1]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[_CountingServer]:
    with serving(_CountingServer()) as httpd:
        yield httpd


def test_async_client_shares_one_connection_pool(counting_server: _CountingServer) -> None:
    server = counting_server
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def run() -> None:
        async with AsyncApexRankClient(url, retries=3, backoff_s=0.01) as client:
            for i in range(5):  # one connection serves call after call...
                assert await client.song(f"s{i}") == {"song_id": f"s{i}"}
            assert server.accepted == 1
            server.fail_next = 2  # ...and the retries of a call
            assert await client.song("s9") == {"song_id": "s9"}
            with pytest.raises(ApexRankError) as err:
                await client.feed("f")
            assert err.value.status == 404 and err.value.code == "not_found"
            assert server.requests == 9 and server.accepted == 1
            # Calls in flight together each need a connection, from the same pool...
            songs = await asyncio.gather(*(client.song(f"c{i}") for i in range(4)))
            assert songs == [{"song_id": f"c{i}"} for i in range(4)]
            pooled = server.accepted
            assert 1 <= pooled <= 5
            for _ in range(3):  # ...which keeps them for later calls
                await client.song("again")
            assert server.accepted == pooled
        with pytest.raises(RuntimeError):  # closed by the `async with`
            await client.song("late")
        # A client per call opens (and closes) a connection per call: the count does see new ones.
        for n in (1, 2):
            async with AsyncApexRankClient(url) as once:
                await once.song("x")
            assert server.accepted == pooled + n

    asyncio.run(run())
