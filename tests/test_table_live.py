"""The API's song table kept live on the real stack: worker, feedback consumer and promotion
write the score store, a running API process serves their writes from its table.

No mocks: the embedded Kafka and Redis of ``tests/conftest.py``, the real ``Worker``, the
real ``FeedbackConsumer`` (its default feed updater), ``rescore_window`` with a promoted head,
and the API through FastAPI's ``TestClient`` (its event loop runs on a thread for the whole
``with`` block, so the table follower runs between requests as it does under uvicorn).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from consumers.feedback import FeedbackConsumer
from consumers.publish import publish_events
from consumers.retrain import rescore_window
from consumers.worker import Worker
from indexes import RedisScoreStore
from indexes.redis_schema import score_field
from ranker.events import TASKS, Engagement
from ranker.model.registry import promote
from ranker.serving.api import create_app
from ranker.serving.table_sync import TableSync
from ranker.serving.writer import FeedWriter
from ranker.settings import ApiSettings, Settings
from tests.golden.paths import RESCORE_SEED, seeded_model
from tests.helpers import event, tone
from tests.test_api import reload_index, with_admin
from tests.test_feedback import publish
from tests.test_policy import NOW, plain, record, with_feeds

#: The staleness bound asserted: from a write's change log entry to the song being served.
BOUND_S = 1.0
#: How often a waiting test asks for the page again.
POLL_S = 0.02


# -- helpers --------------------------------------------------------------------------------------
def metric(client: TestClient, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` (with these labels) on /metrics."""
    text = client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def sync_of(client: TestClient) -> TableSync:
    sync: TableSync = client.app.state.reader.sync  # type: ignore[attr-defined]
    return sync


def page(client: TestClient, feed: str, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    r = client.get(f"/v1/feeds/{feed}", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {it["song_id"]: it for it in body["items"]}


def rank(client: TestClient, feed: str, candidates: list[str]) -> dict[str, Any]:
    r = client.post("/v1/rank", json={"candidates": candidates, "feed": feed})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def serve_until(
    client: TestClient, feed: str, done: Callable[[dict[str, Any]], bool], timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Ask for the first page every POLL_S until ``done(page)``; (that page, time.time() it came back)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = page(client, feed)
        at = time.time()
        if done(body) or time.monotonic() > deadline:
            return body, at
        time.sleep(POLL_S)


def change_log(store: RedisScoreStore) -> list[tuple[float, list[str], list[str]]]:
    """Every entry of the store's change log: (epoch seconds it was appended, song ids, feeds)."""
    entries: Any = store.client.xrange(store.keys.changes())
    out = []
    for position, fields in entries:
        ids, feeds = str(fields.get("ids", "")), str(fields.get("feeds", ""))
        at = int(str(position).split("-")[0]) / 1000.0
        out.append((at, ids.split(",") if ids else [], feeds.split(",") if feeds else []))
    return out


def first_logged(store: RedisScoreStore, song_id: str) -> float:
    """When the first change log entry naming ``song_id`` was appended (just after its write finished)."""
    found = [at for at, ids, _ in change_log(store) if song_id in ids]
    assert found, f"no change log entry names {song_id}"
    return found[0]


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_same_items(live: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    """Same songs in the same order with the same flags; numbers equal up to the clock moving
    between the two requests (freshness decays by ~3e-6 per second at a 72 h half-life)."""
    assert [(i["song_id"], i.get("explore")) for i in live] == [(i["song_id"], i.get("explore")) for i in fresh]
    for a, b in zip(live, fresh, strict=True):
        fa, fb = flat(a), flat(b)
        assert fa.keys() == fb.keys(), a["song_id"]
        for key, va in fa.items():
            vb = fb[key]
            if isinstance(va, float) and not isinstance(va, bool):
                close = pytest.approx(va, abs=1e-3) if key.endswith("age_hours") else pytest.approx(va, rel=1e-6)
                assert vb == close, (a["song_id"], key)
            else:
                assert va == vb, (a["song_id"], key)


@contextmanager
def stalled(client: TestClient) -> Iterator[None]:
    """Block the API's event loop for the block (a process too busy to follow the log)."""
    portal = client.portal
    assert portal is not None
    started, release = threading.Event(), threading.Event()

    async def stall() -> None:
        started.set()
        release.wait(15)  # blocking on purpose: nothing else runs on the loop meanwhile

    portal.start_task_soon(stall)
    assert started.wait(5)
    try:
        yield
    finally:
        release.set()


def engagement(song_id: str, plays: int, likes: int) -> list[Engagement]:
    now = datetime.now(UTC)
    kinds = ["play"] * plays + ["like"] * likes
    return [
        Engagement(event_id=f"{song_id}-ev{k}", song_id=song_id, user_id=f"u{k}", type=kind, ts=now)
        for k, kind in enumerate(kinds)
    ]


# -- the live path: worker, feedback, promotion, and a process started afterwards ----------------
N_SONGS = 6
PAGE = 5  # one exploration slot (round(5 x 0.1)) and a second page


def test_a_running_api_serves_what_the_worker_the_feedback_consumer_and_a_promotion_write(
    redis_settings: Settings, redis_store: RedisScoreStore, tmp_path: Path
) -> None:
    """Once on the single Redis node, once on Redis Cluster (``redis+cluster://``): the worker's
    writes, the per-song engagement and calibration scripts, the rescore, and the API's table
    (its full load by SCAN over every master, then the change log) on each."""
    settings, store = redis_settings, redis_store
    # The page cache off: it would add up to its TTL (1 s) to the staleness measured here, which is
    # the table's. The calibration scale read on every request, so that two processes agree on it.
    s = with_admin(settings.model_copy(update={"api": ApiSettings(page_cache_ttl_s=0.0, calibration_ttl_s=0.0)}))
    feed = s.feed.name
    ids = [f"live-{i}" for i in range(N_SONGS)]
    events = [
        event(sid, tone(tmp_path / f"{sid}.wav", seconds=1.5, freq=180.0 * 1.37**i, seed=i).as_uri())
        for i, sid in enumerate(ids)
    ]
    rng = np.random.default_rng(5)  # exploration of both processes; its state is set before each compared page

    with TestClient(create_app(s, explore_rng=rng)) as live:
        sync = sync_of(live)
        assert page(live, feed)["items"] == []
        observed_before = metric(live, "apexrank_table_staleness_seconds_count")
        under_bound_before = metric(live, "apexrank_table_staleness_seconds_bucket", le="1.0")
        applied_before = sync.applied

        # 1. The worker scores the songs (from Kafka, on a thread): each is served within the bound
        # of its write finishing (its change log entry, appended right after the write).
        publish_events(s, events)
        worker = Worker(s)
        stats: dict[str, Any] = {}
        run = functools.partial(worker.run, until_idle_s=1.0, until_caught_up=True)
        thread = threading.Thread(target=lambda: stats.update(run=run()), daemon=True)
        thread.start()
        served_at: dict[str, float] = {}
        deadline = time.monotonic() + 90
        while len(served_at) < N_SONGS and time.monotonic() < deadline:
            body = page(live, feed)
            at = time.time()
            for item in body["items"]:
                served_at.setdefault(item["song_id"], at)
            time.sleep(POLL_S)
        thread.join(60)
        assert not thread.is_alive()
        assert stats["run"].scored == N_SONGS and stats["run"].dead_letters == 0, stats
        assert sorted(served_at) == ids
        staleness = {sid: served_at[sid] - first_logged(store, sid) for sid in ids}
        assert all(-0.002 <= v < BOUND_S for v in staleness.values()), staleness
        # ... and exported: one observation per change log entry applied, all under the bound.
        observed = metric(live, "apexrank_table_staleness_seconds_count") - observed_before
        assert observed == sync.applied - applied_before > 0
        assert metric(live, "apexrank_table_staleness_seconds_bucket", le="1.0") - under_bound_before == observed
        ready = live.get("/readyz").json()["table"]
        assert ready == {"ready": True, "songs": N_SONGS}
        assert metric(live, "apexrank_table_songs") == N_SONGS and metric(live, "apexrank_table_ready") == 1

        # 2. Engagement through the feedback consumer moves the song's posterior in the page and in
        # /v1/rank, in the same process.
        target = ids[2]
        before = by_id(page(live, feed))[target]["components"]
        assert (before["plays"], before["likes"]) == (0, 0)
        publish(s, [e.to_bytes() for e in engagement(target, plays=7, likes=3)], [target.encode()] * 10)
        fb = FeedbackConsumer(s).run(until_idle_s=1.0, until_caught_up=True)
        assert fb.accepted == 10, fb
        body, _ = serve_until(live, feed, lambda b: by_id(b)[target]["components"]["plays"] == 7, 2 * BOUND_S)
        after = by_id(body)[target]["components"]
        assert (after["plays"], after["likes"]) == (7, 3), after
        w = s.feed.default.prior_strength
        assert after["posterior_rate"] == pytest.approx((w * after["prior_rate"] + 3) / (w + 7), rel=1e-9)
        assert after["posterior_rate"] != pytest.approx(before["posterior_rate"], rel=1e-3)
        ranked = by_id(rank(live, feed, ids))[target]["components"]
        assert (ranked["plays"], ranked["likes"]) == (7, 3)
        assert ranked["posterior_rate"] == pytest.approx(after["posterior_rate"], rel=1e-9)
        truth = live.get(f"/v1/songs/{target}").json()  # read from the store, not the table
        assert truth["engagement"]["plays"] == 7
        assert truth["feeds"][feed]["posterior_rate"] == pytest.approx(after["posterior_rate"], rel=1e-9)

        # 3. A promoted head rescores the cold-start window: the running process serves the new
        # model's values (what the store now holds, read back through /v1/songs).
        served_before = by_id(page(live, feed))
        stored_before = dict(store.feed_page(feed, 0, 100))
        models_root = s.state_dir / "models"
        model = seeded_model(s, RESCORE_SEED)
        promote(models_root, model.save_versioned(models_root))
        assert rescore_window(s, model, store) == N_SONGS
        assert all(r is not None and r["model_version"] == model.version for r in store.get_songs(ids))
        stored_after = dict(store.feed_page(feed, 0, 100))
        assert stored_after.keys() == stored_before.keys() and stored_after != stored_before

        # The calibration scale moved too (the rescore re-claims the songs at their new priors), so a
        # served prior that merely differs from before proves nothing: wait until the page agrees
        # with the store on every song, then check everything against it.
        deadline = time.monotonic() + 2 * BOUND_S
        while True:
            served_after = by_id(page(live, feed))
            truths = {sid: live.get(f"/v1/songs/{sid}").json() for sid in ids}  # the store's, not the table's
            agree = all(
                served_after[sid]["components"]["prior_rate"] == pytest.approx(truths[sid]["like_rate"]["prior"])
                and served_after[sid]["components"]["quality"] == pytest.approx(truths[sid]["feeds"][feed]["quality"])
                for sid in ids
            )
            if agree or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        ranked_after = by_id(rank(live, feed, ids))
        for sid in ids:
            truth, comp = truths[sid], served_after[sid]["components"]
            assert truth["model_version"] == model.version
            assert comp["prior_rate"] == pytest.approx(truth["like_rate"]["prior"], rel=1e-9), sid
            assert comp["prior_rate"] != pytest.approx(served_before[sid]["components"]["prior_rate"], rel=1e-6), sid
            assert comp["posterior_rate"] == pytest.approx(truth["feeds"][feed]["posterior_rate"], rel=1e-9), sid
            assert comp["quality"] == pytest.approx(truth["feeds"][feed]["quality"], rel=1e-9), sid
            # The score decays with the wall clock (freshness), and the three reads are apart in time
            # (on a loaded Cluster run, a fifth of a second: 1.5e-6 of the score): compare it per unit
            # of each read's own freshness.
            truth_feed, ranked_comp = truth["feeds"][feed], ranked_after[sid]["components"]
            per_fresh = served_after[sid]["score"] / comp["freshness"]
            assert per_fresh == pytest.approx(truth_feed["score"] / truth_feed["freshness"], rel=1e-9), sid
            assert per_fresh == pytest.approx(ranked_after[sid]["score"] / ranked_comp["freshness"], rel=1e-9), sid
            assert served_after[sid]["score"] != pytest.approx(served_before[sid]["score"], rel=1e-6), sid

        # 4. A process started after all of this serves the same pages as the one that saw it live
        # (the same exploration draws; the live one reloads its index first, as the fresh one loads
        # it, so that both see the songs' vectors for the near-duplicate rule).
        assert reload_index(live)["vectors"] == N_SONGS
        with TestClient(create_app(s, explore_rng=rng)) as fresh:
            assert fresh.get("/readyz").json()["table"] == {"ready": True, "songs": N_SONGS}
            cursor_live = cursor_fresh = None
            for n in range(2):
                state = rng.bit_generator.state
                a = page(live, feed, PAGE, cursor_live)
                rng.bit_generator.state = state
                b = page(fresh, feed, PAGE, cursor_fresh)
                assert_same_items(a["items"], b["items"])
                assert a["next_cursor"] == b["next_cursor"], n
                assert any(i["explore"] for i in a["items"]) or n == 1
                cursor_live, cursor_fresh = a["next_cursor"], b["next_cursor"]
            assert cursor_live is None  # two pages hold the six songs
            assert_same_items(rank(live, feed, ids)["items"], rank(fresh, feed, ids)["items"])


# -- the change log, without the worker -----------------------------------------------------------
FEED = "f"


def feed_settings(settings: Settings, **api: Any) -> Settings:
    """One plain feed (no decay, no exploration, no de-duplication, no calibration)."""
    s = with_feeds(settings, {FEED: plain(weights={"likes": 1.0}, half_life_hours=None)}, calibrate=False)
    return s.model_copy(update={"api": ApiSettings(**api)})


def ids_of(body: dict[str, Any]) -> list[str]:
    return [it["song_id"] for it in body["items"]]


def test_the_table_follows_writes_feed_removals_and_lost_scores(settings: Settings, store: RedisScoreStore) -> None:
    """With the default API settings (page cache on): a change is served within the cache's TTL
    plus the bound; a song out of the feed leaves the page; a song without scores leaves the table."""
    s = feed_settings(settings)
    ttl = s.api.page_cache_ttl_s
    writer = FeedWriter(s, store)
    writer.on_scored([record("A", likes=80), record("B", likes=60), record("C", likes=40)], now=NOW)
    with TestClient(create_app(s)) as client:
        sync = sync_of(client)
        assert ids_of(page(client, FEED)) == ["A", "B", "C"]

        writer.on_scored([record("D", likes=90)])
        t0 = time.time()
        body, at = serve_until(client, FEED, lambda b: "D" in ids_of(b), ttl + 2 * BOUND_S)
        assert ids_of(body) == ["D", "A", "B", "C"] and at - t0 < ttl + BOUND_S, at - t0
        assert sync.table is not None and "D" in sync.table

        # Out of the feed, still a scored song: gone from the page, still ranked.
        store.write_feed_entries([], {FEED: {"B": None}})
        t0 = time.time()
        body, at = serve_until(client, FEED, lambda b: "B" not in ids_of(b), ttl + 2 * BOUND_S)
        assert ids_of(body) == ["D", "A", "C"] and at - t0 < ttl + BOUND_S, at - t0
        ranked = rank(client, FEED, ["A", "B", "C", "D"])
        assert ids_of(ranked) == ["D", "A", "B", "C"] and ranked["unknown"] == []

        # Its scores deleted (the hash keeps its other fields), then logged by a feed removal:
        # the song leaves the page and the table, and /v1/rank lists it as unknown.
        store.client.hdel(store.song_key("C"), *(score_field(t) for t in TASKS))
        store.write_feed_entries([], {FEED: {"C": None}})
        t0 = time.time()
        body, at = serve_until(client, FEED, lambda b: "C" not in ids_of(b), ttl + 2 * BOUND_S)
        assert ids_of(body) == ["D", "A"] and at - t0 < ttl + BOUND_S, at - t0
        assert client.portal is not None and client.portal.call(sync.caught_up, 5.0)
        assert "C" not in sync.table and len(sync.table) == 3
        ranked = rank(client, FEED, ["A", "B", "C", "D"])
        assert ids_of(ranked) == ["D", "A", "B"] and ranked["unknown"] == ["C"]
        assert client.get("/readyz").json()["table"] == {"ready": True, "songs": 3}


def write_more_then_trim(writer: FeedWriter, store: RedisScoreStore) -> None:
    """Song E (new), then A (moved to the top), each its own write and log entry; then the whole
    log trimmed away, then F written. A follower that read E's entry has not read A's."""
    writer.on_scored([record("E", likes=70)], now=NOW)
    writer.on_scored([record("A", likes=99)], now=NOW)
    store.client.xtrim(store.keys.changes(), maxlen=0, approximate=False)
    assert store.client.xlen(store.keys.changes()) == 0
    writer.on_scored([record("F", likes=10)], now=NOW)


def test_a_follower_restarted_past_a_trimmed_log_reads_the_store_again(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = feed_settings(settings, page_cache_ttl_s=0.0)
    writer = FeedWriter(s, store)
    writer.on_scored([record("A", likes=50), record("B", likes=60), record("C", likes=40)], now=NOW)
    with TestClient(create_app(s)) as client:
        sync = sync_of(client)
        portal = client.portal
        assert portal is not None
        writer.on_scored([record("D", likes=45)], now=NOW)  # the follower's position: a real entry
        assert portal.call(sync.caught_up, 5.0)
        assert ids_of(page(client, FEED)) == ["B", "A", "D", "C"]
        loads = metric(client, "apexrank_table_loads_total")

        portal.call(sync.close)  # the follower stops; the table keeps serving
        write_more_then_trim(writer, store)
        assert ids_of(page(client, FEED)) == ["B", "A", "D", "C"]
        portal.call(sync.start)

        body, _ = serve_until(client, FEED, lambda b: ids_of(b)[:1] == ["A"], 3 * BOUND_S)
        assert ids_of(body) == ["A", "E", "B", "D", "C", "F"]
        assert metric(client, "apexrank_table_loads_total") == loads + 1
        assert client.get("/readyz").json()["table"] == {"ready": True, "songs": 6}


def test_a_running_follower_that_falls_behind_a_trimmed_log_reads_the_store_again(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = feed_settings(settings, page_cache_ttl_s=0.0)
    writer = FeedWriter(s, store)
    writer.on_scored([record("A", likes=50), record("B", likes=60), record("C", likes=40)], now=NOW)
    with TestClient(create_app(s)) as client:
        sync = sync_of(client)
        assert client.portal is not None
        writer.on_scored([record("D", likes=45)], now=NOW)
        assert client.portal.call(sync.caught_up, 5.0)
        loads = metric(client, "apexrank_table_loads_total")

        with stalled(client):  # the process falls behind while the log is written and trimmed
            write_more_then_trim(writer, store)

        body, _ = serve_until(client, FEED, lambda b: ids_of(b)[:1] == ["A"], 3 * BOUND_S)
        assert client.portal.call(sync.caught_up, 5.0)
        body = page(client, FEED)
        assert ids_of(body) == ["A", "E", "B", "D", "C", "F"]
        assert metric(client, "apexrank_table_loads_total") == loads + 1


async def close_within(sync: TableSync, timeout_s: float) -> bool:
    """``sync.close()`` bounded: whether it returned in time (if not, its task is cancelled until it
    takes, so that the test can go on and the app can shut down)."""
    task = sync._task
    try:
        await asyncio.wait_for(asyncio.shield(sync.close()), timeout_s)
        return True
    except TimeoutError:
        while task is not None and not task.done():
            task.cancel()
            await asyncio.sleep(0.01)
        return False


def test_the_follower_stops_promptly_while_the_store_is_being_written(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = feed_settings(settings, page_cache_ttl_s=0.0)
    writer = FeedWriter(s, store)
    writer.on_scored([record(f"w{i}") for i in range(10)], now=NOW)
    stop = threading.Event()

    def write_on() -> None:  # what the worker and the feedback consumer do all day
        n = 0
        while not stop.is_set():
            writer.on_scored([record(f"w{n % 10}", likes=float(n % 97))], now=NOW)
            n += 1

    with TestClient(create_app(s)) as client:
        sync = sync_of(client)
        portal = client.portal
        assert portal is not None
        thread = threading.Thread(target=write_on, daemon=True)
        thread.start()
        try:
            for cycle in range(10):
                time.sleep(0.05)
                stopped = portal.call(close_within, sync, 2.0)
                portal.call(sync.start)
                assert stopped, f"cycle {cycle}: TableSync.close() had not returned after 2 s"
        finally:
            stop.set()
            thread.join(10)
            assert portal.call(sync.caught_up, 10.0)  # idle again before the app shuts down
            time.sleep(0.1)  # ... and blocked on the log, where a cancellation is not lost
