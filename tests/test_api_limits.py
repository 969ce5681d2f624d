"""API limits: inline policies never give a 5xx, and the page cache stays within its bytes and TTL.

On the real Redis, through FastAPI's TestClient (or the FeedReader the API runs).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from indexes import RedisScoreStore, SongRecord
from ranker.events import TASKS
from ranker.serving.api import create_app
from ranker.serving.batch import SongBatch
from ranker.serving.page_cache import PageCache, _Window, window_nbytes
from ranker.serving.reader import FeedReader
from ranker.serving.state import READ_FIELDS
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, Settings
from tests.test_policy import NOW, plain, record, with_feeds

CANDIDATES = ["fresh", "old", "future", "liked", "played", "ghost"]


def scored_songs(settings: Settings, store: RedisScoreStore) -> Settings:
    """Two feeds and songs at the edges: just made, ten years old, dated 9999, likes without plays."""
    s = with_feeds(settings, {"f": plain(half_life_hours=24), "g": plain(half_life_hours=None, prior_strength=1)})
    future = SongRecord(**{**record("future", likes=99).__dict__, "created_at": "9999-12-31T23:59:59+00:00"})
    FeedWriter(s, store).on_scored(
        [
            record("fresh", likes=80),
            record("old", likes=10, age_h=24 * 365 * 10),
            future,
            record("liked", likes=50, coherence=5.0),
            record("played", likes=1.0, streams=100.0),
        ],
        now=NOW,
    )
    store.client.hset(store.song_key("liked"), mapping={"eng.likes": 1000})  # likes counted before plays
    store.client.hset(store.song_key("played"), mapping={"eng.plays": 10**9, "eng.likes": 5 * 10**8})
    return s


def finite_json(text: str) -> Any:
    """Parse a response, refusing NaN, Infinity and numbers that overflow a float."""

    def number(value: str) -> float:
        out = float(value)
        assert math.isfinite(out), f"non-finite number {value} in {text[:300]}"
        return out

    def constant(value: str) -> float:
        raise AssertionError(f"{value} in a response: {text[:300]}")

    return json.loads(text, parse_float=number, parse_constant=constant)


def post(client: TestClient, body: dict[str, Any]) -> Any:
    """POST /v1/rank with ``body`` encoded as Python does (NaN and Infinity as bare tokens)."""
    content = json.dumps(body, allow_nan=True)
    return client.post("/v1/rank", content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"weights": {"likes": 1e308}}, "weights"),
        ({"weights": {"likes": "NaN"}}, "weights"),
        ({"weights": {"likes": math.inf}}, "weights"),
        ({"half_life_hours": 1e308}, "half_life_hours"),
        ({"half_life_hours": math.nan}, "half_life_hours"),
        ({"half_life_hours": 5e-324}, "half_life_hours"),
        ({"prior_strength": 1e308}, "prior_strength"),
        ({"prior_strength": 5e-324}, "non-finite value at items.0.components.posterior_rate"),
    ],
)
def test_extreme_inline_policies_are_a_422(
    settings: Settings, store: RedisScoreStore, extra: dict[str, Any], says: str
) -> None:
    s = scored_songs(settings, store)
    with TestClient(create_app(s)) as client:
        r = post(client, {"candidates": CANDIDATES, **extra})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_policy" and says in body["message"]


def test_tiny_but_finite_inline_policies_still_rank(settings: Settings, store: RedisScoreStore) -> None:
    s = scored_songs(settings, store)
    with TestClient(create_app(s)) as client:
        for extra in ({"half_life_hours": 1e-300}, {"prior_strength": 1e-300}, {"weights": {"likes": 5e-324}}):
            r = post(client, {"candidates": ["fresh", "old", "future", "played"], **extra})
            assert r.status_code == 200, (extra, r.text)
            body = finite_json(r.text)
            assert {i["song_id"] for i in body["items"]} == {"fresh", "old", "future", "played"}
            for item in body["items"]:
                assert 0 <= item["components"]["freshness"] <= 1


_EDGES = [0.0, -0.0, 5e-324, 1e-310, 1e-300, 1e-9, 0.5, 1.0, 72.0, 1e6, 1e6 + 1, 1e9, 1e10, 1e300, 1e308, -1.0, -1e308]
_NUMBER = st.one_of(
    st.sampled_from(_EDGES),
    st.sampled_from([math.nan, math.inf, -math.inf]),  # sent as the bare tokens NaN / Infinity
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "nan", "x", ""]),
    st.floats(),
    st.floats(min_value=0.0, max_value=1e6),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
)
#: Half the draws at the edges where sums, quotients and exponentials stop being finite.
_PARAM = st.one_of(st.sampled_from([0.0, 5e-324, 1e-310, 1e-300, 1e-9, 1e6, 1e9, 1e300, 1e308]), _NUMBER)
_ABSENT = object()


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Present half the time (``optional=`` in fixed_dictionaries leaves keys out far more often)."""
    return st.one_of(st.just(_ABSENT), strategy)


_BODY = st.fixed_dictionaries(
    {
        "candidates": st.one_of(
            st.just(CANDIDATES), st.lists(st.sampled_from(CANDIDATES), min_size=1, max_size=6, unique=True)
        ),
        "weights": _maybe(
            st.one_of(st.none(), st.dictionaries(st.sampled_from([*TASKS, "vibes"]), _PARAM, max_size=8))
        ),
        "half_life_hours": _maybe(_PARAM),
        "prior_strength": _maybe(_PARAM),
        "feed": _maybe(st.sampled_from(["f", "g"])),
        "explain": _maybe(st.booleans()),
        "apply_filters": _maybe(st.booleans()),
    },
).map(lambda body: {k: v for k, v in body.items() if v is not _ABSENT})


def test_inline_policy_parameters_never_give_a_5xx(settings: Settings, store: RedisScoreStore) -> None:
    s = scored_songs(settings, store)
    statuses: dict[int, int] = {}
    with TestClient(create_app(s)) as client:

        @hypothesis_settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(body=_BODY)
        @example(body={"candidates": CANDIDATES, "prior_strength": 5e-324})  # likes without plays: m = inf
        @example(body={"candidates": CANDIDATES, "half_life_hours": 5e-324})  # decay = inf; inf * 0 = NaN
        @example(body={"candidates": CANDIDATES, "weights": {"likes": 1e308, "streams": 1e308}})
        def check(body: dict[str, Any]) -> None:
            r = post(client, body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            payload = finite_json(r.text)
            if r.status_code == 200:
                assert {i["song_id"] for i in payload["items"]} | set(payload["unknown"]) | set(
                    payload["filtered"]
                ) == set(body["candidates"])
            else:
                assert r.status_code == 422 and payload["error"] and payload["message"], r.text

        check()
    assert statuses.get(200, 0) > 10 and statuses.get(422, 0) > 10, statuses  # both sides were exercised


# -- the page cache --------------------------------------------------------------------------------
def many_songs(settings: Settings, store: RedisScoreStore, n: int, **api: Any) -> Settings:
    s = with_feeds(settings, {"c": plain(half_life_hours=None)}, calibrate=False)
    s = s.model_copy(update={"api": ApiSettings(**api)})
    FeedWriter(s, store).on_scored([record(f"s{i:04d}", likes=100 - i * 100 / n) for i in range(n)], now=NOW)
    return s


def test_page_cache_stays_within_its_bytes_over_hundreds_of_cursors(settings: Settings, store: RedisScoreStore) -> None:
    cap = 60_000
    s = many_songs(settings, store, 1000, page_cache_max_bytes=cap, page_cache_ttl_s=600)
    with TestClient(create_app(s)) as client:
        reader: FeedReader = client.app.state.reader  # type: ignore[attr-defined]
        cursor, pages, served = None, 0, 0
        largest = 0
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            r = client.get("/v1/feeds/c", params=params)
            assert r.status_code == 200, r.text
            served += len(r.json()["items"])
            pages += 1
            largest = max(largest, reader.page_cache.nbytes)
            assert 0 < reader.page_cache.nbytes <= cap
            cursor = r.json()["next_cursor"]
            if not cursor:
                break
        assert pages >= 300 and served == 1000
        assert len(reader.page_cache) < pages / 10  # most windows were evicted, by bytes
        assert largest > cap / 2  # and it did fill up to about its cap
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("apexrank_api_page_cache_bytes "))
        assert 0 < float(line.split()[1]) <= cap
        # a hot page is still served from the cache
        client.get("/v1/feeds/c", params={"limit": 3})
        hot = reader.page_cache.get(("c", "", 3))
        assert hot is not None
        client.get("/v1/feeds/c", params={"limit": 3})
        assert reader.page_cache.get(("c", "", 3)) is hot


def test_page_cache_drops_expired_windows_and_oversized_ones(settings: Settings, store: RedisScoreStore) -> None:
    s = many_songs(settings, store, 300, page_cache_ttl_s=30, page_cache_max_bytes=10**7)
    clock = [1000.0]

    async def run() -> None:
        reads = store.async_reads()
        try:
            reader = FeedReader(s, reads, monotonic=lambda: clock[0])
            await reader.sync.load()
            cache = reader.page_cache
            cursor = None
            for _ in range(40):
                page = await reader.page("c", 5, cursor)
                cursor = page.next_cursor
                assert cursor
            assert len(cache) == 40
            held = cache.nbytes
            assert held > 0
            clock[0] += 29
            again = await reader.page("c", 5, cursor)  # an insert, before the TTL: nothing expires
            assert len(cache) == 41 and cache.nbytes > held
            clock[0] += 2  # the first 40 are past their 30 s; the 41st is 2 s old
            assert cache.get(("c", "", 5)) is None  # an expired entry is never served
            await reader.page("c", 5, again.next_cursor)
            assert len(cache) == 2  # the insert dropped every expired entry
            clock[0] += 31
            assert cache.expire() == 2 and len(cache) == 0 and cache.nbytes == 0
            # a window larger than the whole budget is not cached
            reader.page_cache = PageCache(30.0, 1000, clock=lambda: clock[0])
            await reader.page("c", 5)
            assert len(reader.page_cache) == 0 and reader.page_cache.nbytes == 0
        finally:
            await reads.close()

    asyncio.run(run())


def window(n_rows: int, dim: int = 0) -> _Window:
    w = _Window(0.0)
    w.ids = [f"s{i}" for i in range(n_rows)]
    w.stored = [1.0] * n_rows
    w.eligible = list(range(n_rows))
    w.batch = SongBatch.from_fields(w.ids, [[repr(3.0)] * len(READ_FIELDS)] * n_rows)
    if dim:
        w.gram = np.zeros((dim, dim), dtype=np.float32)
    return w


def test_page_cache_is_lru_within_its_byte_budget() -> None:
    clock = [0.0]
    one = window_nbytes(window(10), ("f", "a", 5))
    assert window_nbytes(window(10, dim=100)) >= 100 * 100 * 4  # the gram matrix counts in full
    cache = PageCache(ttl_s=10, max_bytes=3 * one + 10, clock=lambda: clock[0])
    for token in "abc":
        cache.put(("f", token, 5), window(10))
    assert len(cache) == 3 and cache.nbytes == 3 * one
    assert cache.get(("f", "a", 5)) is not None  # a is now the most recently used
    cache.put(("f", "d", 5), window(10))
    assert cache.get(("f", "b", 5)) is None and cache.get(("f", "a", 5)) is not None
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    cache.put(("f", "a", 5), window(10))  # replacing an entry does not count it twice
    assert len(cache) == 3 and cache.nbytes == 3 * one
    cache.put(("f", "big", 5), window(10, dim=200))  # 160 kB: over the whole budget, not cached
    assert cache.get(("f", "big", 5)) is None and len(cache) == 3
    clock[0] = 10.0
    assert cache.get(("f", "a", 5)) is None  # expired at its TTL, whatever its recency
    assert PageCache(ttl_s=0, max_bytes=10**6).enabled is False
