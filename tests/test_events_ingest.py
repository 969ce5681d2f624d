"""``POST /v1/events`` on the real stack (issue 16, item 4): per-event answers, exactly the valid events on
the engagement topic, a replayed batch counted once by the real feedback consumer, the request limits,
Kafka down (503, every event failed, nothing lost), the API's producer record by record, and both
clients' ``send_events`` against real uvicorn servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import SecretStr

from consumers.feedback import FeedbackConsumer
from consumers.stack import free_port
from ranker import stores
from ranker.events import Engagement
from ranker.serving.api import create_app
from ranker.serving.client import ApexRankClient, AsyncApexRankClient, EventsNotPublished, EventsResult
from ranker.serving.producer import ApiProducer
from ranker.settings import Settings
from tests.helpers import read_topic
from tests.test_client import Served

TOKEN = "events-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def with_events(settings: Settings, **api: Any) -> Settings:
    """The test's settings with a read token (events take the read endpoints' tokens) and ``api`` overrides."""
    return settings.model_copy(update={"api": settings.api.model_copy(update={"tokens": [SecretStr(TOKEN)], **api})})


def down(settings: Settings) -> Settings:
    """``settings`` with Kafka at a closed loopback port, failing fast."""
    kafka = settings.kafka.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_ms": 2000}
    )
    return settings.model_copy(update={"kafka": kafka})


def ev(song_id: str, kind: str = "play", event_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """One engagement event as a client sends it (JSON-ready)."""
    return {
        "event_id": event_id or f"e-{uuid.uuid4().hex[:12]}",
        "song_id": song_id,
        "user_id": "u1",
        "type": kind,
        "ts": datetime.now(UTC).isoformat(),
        **extra,
    }


def on_topic(settings: Settings, expect: int) -> list[tuple[str, Engagement]]:
    """The engagement topic's records as (key, parsed event), read until ``expect`` came (then drained)."""
    return [
        (r.key.decode(), Engagement.parse(r.value))
        for r in read_topic(settings, settings.kafka.topics.engagement, expect)
    ]


@pytest.fixture
def app_client(settings: Settings) -> Iterator[tuple[TestClient, Settings]]:
    s = with_events(settings)
    with TestClient(create_app(s)) as client:
        yield client, s


def test_a_mixed_batch_is_answered_event_by_event_and_only_valid_events_reach_the_topic(
    app_client: tuple[TestClient, Settings],
) -> None:
    client, s = app_client
    batch = [
        ev("song.a", "play", "ev-1"),
        ev("song.b", "like", "ev-2", feed="cold-start", position=3),
        ev("song.a", "clap", "ev-3"),  # not an engagement type
        ev("song.c", "play", "ev-1"),  # ev-1 again: a duplicate, whatever its content
        "not an object",
        {**ev("song.c", "skip", "ev-4"), "extra": 1},  # unknown field
        ev("song.c", "share", "ev-5", ts="2026-01-01T00:00:00"),  # no timezone
        ev("song.c", "skip", "ev-6"),
    ]
    assert client.post("/v1/events", json={"events": batch}).status_code == 401  # the read endpoints' tokens
    r = client.post("/v1/events", json={"events": batch}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert [(x["index"], x["event_id"], x["status"]) for x in body["results"]] == [
        (0, "ev-1", "accepted"),
        (1, "ev-2", "accepted"),
        (2, "ev-3", "rejected"),
        (3, "ev-1", "duplicate"),
        (4, None, "rejected"),
        (5, "ev-4", "rejected"),
        (6, "ev-5", "rejected"),
        (7, "ev-6", "accepted"),
    ]
    assert (body["accepted"], body["rejected"], body["duplicate"], body["failed"]) == (3, 4, 1, 0)
    results = body["results"]
    assert results[3]["duplicate_of"] == 0 and "error" not in results[0] and "error" not in results[3]
    assert {results[i]["error"]["code"] for i in (2, 4, 5, 6)} == {"invalid_schema"}
    assert (
        results[2]["error"]["message"].startswith("type:")
        and "expected a JSON object" in results[4]["error"]["message"]
    )
    assert "extra" in results[5]["error"]["message"] and results[6]["error"]["message"].startswith("ts:")

    got = on_topic(s, 3)
    assert sorted((key, e.event_id, e.song_id, e.type) for key, e in got) == [
        ("song.a", "ev-1", "song.a", "play"),  # the first ev-1, keyed by its song as the consumers key
        ("song.b", "ev-2", "song.b", "like"),
        ("song.c", "ev-6", "song.c", "skip"),
    ]
    assert next(e for _, e in got if e.event_id == "ev-2").position == 3


def test_a_replayed_batch_counts_once_after_the_real_feedback_consumer(app_client: tuple[TestClient, Settings]) -> None:
    client, s = app_client
    batch = [ev("song.r", "play"), ev("song.r", "like"), ev("song.r", "play"), ev("song.q", "skip")]
    for _ in range(2):  # a client retrying a batch whose answer it never saw
        r = client.post("/v1/events", json={"events": batch}, headers=AUTH)
        assert r.status_code == 202 and r.json()["accepted"] == 4
    assert len(on_topic(s, 8)) == 8  # both copies are on the topic...
    feedback = FeedbackConsumer(s)
    stats = feedback.run(until_idle_s=2.0, until_caught_up=True)
    assert stats.messages == 8 and stats.accepted == 4 and stats.duplicates == 4
    counters = stores.engagement_counters(s)
    try:
        counts = counters.counts(["song.r", "song.q"])  # ...and each event counts once
    finally:
        counters.close()
    assert (counts["song.r"]["plays"], counts["song.r"]["likes"], counts["song.q"]["skips"]) == (2, 1, 1)


def test_an_event_time_ahead_of_the_clock_or_before_ts_min_is_rejected_as_the_consumer_would(
    app_client: tuple[TestClient, Settings],
) -> None:
    """feedback.ts_max_skew_s (300 s) and feedback.ts_min (2020): the same bounds and code as the feedback
    consumer's dead letters; a minute ahead is clock skew, accepted."""
    client, s = app_client
    now = datetime.now(UTC)
    batch = [
        ev("song.a", event_id="skewed", ts=(now + timedelta(seconds=60)).isoformat()),
        ev("song.a", event_id="ahead", ts=(now + timedelta(hours=1)).isoformat()),
        ev("song.a", event_id="ancient", ts="2019-12-31T23:59:59Z"),
    ]
    r = client.post("/v1/events", json={"events": batch}, headers=AUTH)
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected", "rejected"]
    assert [x["error"]["code"] for x in results[1:]] == ["invalid_ts", "invalid_ts"]
    assert "in the future" in results[1]["error"]["message"] and "2020" in results[2]["error"]["message"]
    assert [e.event_id for _, e in on_topic(s, 1)] == ["skewed"]


def test_an_event_nested_too_deep_to_re_encode_is_rejected_alone(app_client: tuple[TestClient, Settings]) -> None:
    """orjson reads 1,024 levels of nesting but writes about 254: such an event is rejected on its own,
    and the batch's good event is published (it answered 500 and published nothing)."""
    client, s = app_client
    deep = ev("song.a", event_id="deep", feed="x")
    deep["feed"] = json.loads("[" * 300 + "]" * 300)
    r = client.post("/v1/events", content=json.dumps({"events": [ev("song.b", event_id="fine"), deep]}), headers=AUTH)
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected"]
    assert results[1]["error"]["code"] == "invalid_schema"
    assert [e.event_id for _, e in on_topic(s, 1)] == ["fine"]


def test_limits_an_empty_batch_too_many_events_a_body_too_large_and_a_body_that_is_not_a_batch(
    settings: Settings,
) -> None:
    s = with_events(settings, max_events_per_request=3, max_body_bytes=2048)
    with TestClient(create_app(s)) as client:

        def post(body: Any, **kw: Any) -> tuple[int, str]:
            r = client.post("/v1/events", headers=AUTH, **({"json": body} if body is not None else kw))
            return r.status_code, r.json()["error"] if r.status_code != 202 else "ok"

        assert post({"events": []}) == (400, "empty_batch")
        assert post({"events": [ev("s.1") for _ in range(4)]}) == (413, "too_many_events")
        assert post({"events": [ev("s.1") for _ in range(3)]}) == (202, "ok")  # at the limit
        big = [ev("s.1", user_id="u" * 128), ev("s.2", user_id="v" * 128), ev("s.3", feed="f" * 64)]
        big[2]["padding"] = "x" * 1600  # the body passes 2048 bytes with three events
        assert len(json.dumps({"events": big})) > 2048
        assert post({"events": big}) == (413, "body_too_large")
        assert post(None, content=b"{not json") == (422, "invalid_request")
        assert post([ev("s.1")]) == (422, "invalid_request")  # a bare list: the body is {"events": [...]}
        assert post({"events": ev("s.1")}) == (422, "invalid_request")
        assert post({"events": [ev("s.1")], "more": 1}) == (422, "invalid_request")
        documented = client.get("/openapi.json").json()["paths"]["/v1/events"]["post"]["requestBody"]
        events = documented["content"]["application/json"]["schema"]["properties"]["events"]
        assert (events["minItems"], events["maxItems"], events["items"]["title"]) == (1, 3, "Engagement")
    assert sorted(e.song_id for _, e in on_topic(s, 3)) == ["s.1"] * 3  # only the batch at the limit got in


def test_kafka_down_answers_503_with_every_event_failed_and_a_resend_loses_nothing(settings: Settings) -> None:
    s = with_events(settings)
    batch = [ev("song.d", "play", "d-1"), ev("song.d", "like", "d-2"), ev("song.d", "play", "d-1"), {"nope": 1}]
    with TestClient(create_app(down(s))) as client:
        r = client.post("/v1/events", json={"events": batch}, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    body = r.json()
    assert body["error"] == "events_not_published" and (body["accepted"], body["failed"]) == (0, 2)
    assert [x["status"] for x in body["results"]] == ["failed", "failed", "duplicate", "rejected"]
    assert {x["error"]["code"] for x in body["results"][:2]} == {"not_published"}
    # Kafka back: the failed events sent again are all in, once.
    failed = [batch[x["index"]] for x in body["results"] if x["status"] == "failed"]
    with TestClient(create_app(s)) as client:
        again = client.post("/v1/events", json={"events": failed}, headers=AUTH)
    assert again.status_code == 202 and again.json()["accepted"] == 2
    assert sorted(e.event_id for _, e in on_topic(s, 2)) == ["d-1", "d-2"]


def test_the_api_producer_answers_for_each_record(settings: Settings) -> None:
    topic = f"{settings.kafka.topics.engagement}.producer"
    kafka = settings.kafka.model_copy(update={"max_request_size": 65_536})
    producer = ApiProducer(kafka)
    try:
        out = producer.publish(topic, [(b"k1", b"one"), (b"k2", b"x" * 70_000), (None, b"three")])
        assert [d.ok for d in out] == [True, False, True]
        assert out[1].permanent and "MessageSizeTooLarge" in (out[1].error or "")  # refused alone, for what it is
        assert out[0].offset is not None and out[0].partition is not None
        assert producer.publish(topic, []) == []
    finally:
        producer.close()
    assert sorted(r.value for r in read_topic(settings, topic, 2)) == [b"one", b"three"]
    dead = ApiProducer(down(settings).kafka)
    try:
        out = dead.publish(topic, [(b"k", b"v")] * 3)
        assert len(out) == 3 and not any(d.ok or d.permanent for d in out)  # an outage: worth a retry
    finally:
        dead.close()


def test_closing_the_api_producer_does_not_wait_on_a_connect_in_progress(settings: Settings) -> None:
    """A shutdown with Kafka unreachable: the shipper's publish is connecting (holding the producer's
    lock for up to kafka.request_timeout_ms); close returns without waiting for it, and the connecting
    thread, finding the producer closed, drops what it made."""
    kafka = down(settings).kafka.model_copy(update={"request_timeout_ms": 4000})
    producer = ApiProducer(kafka)
    out: list[Any] = []
    sender = threading.Thread(target=lambda: out.extend(producer.publish("t", [(b"k", b"v")])))
    sender.start()
    deadline = time.monotonic() + 5
    while not producer._lock.locked() and time.monotonic() < deadline:  # the sender is connecting
        time.sleep(0.01)
    assert producer._lock.locked()
    producer.close()
    assert sender.is_alive()  # close came back while the connect was still waiting on the closed port
    sender.join(30)
    assert not sender.is_alive()
    assert len(out) == 1 and not out[0].ok
    assert producer._producer is None
    assert not producer.publish("t", [(b"k", b"v")])[0].ok  # closed: nothing more is sent


def test_publishes_waiting_on_a_failed_connection_attempt_fail_with_it(settings: Settings) -> None:
    """Kafka unreachable: one connection attempt at a time (up to kafka.request_timeout_ms), and the
    publishes queued behind it fail with its error instead of each making its own; they waited N
    attempts in turn. Within the backoff after a failure a publish fails at once; after it, one tries again."""
    kafka = down(settings).kafka.model_copy(update={"request_timeout_ms": 4000})
    producer = ApiProducer(kafka, backoff_s=0)  # no window: only the publishes that waited share the failure
    out: dict[int, list[Any]] = {}

    def publish(i: int) -> None:
        out[i] = producer.publish("t", [(b"k", b"v")] * (i + 1))

    first = threading.Thread(target=publish, args=(0,))
    first.start()
    deadline = time.monotonic() + 5
    while not producer._lock.locked() and time.monotonic() < deadline:  # the first attempt is under way
        time.sleep(0.01)
    assert producer._lock.locked()
    waiting = [threading.Thread(target=publish, args=(i,)) for i in range(1, 6)]
    for t in waiting:
        t.start()
    for t in [first, *waiting]:
        t.join(60)
    assert producer.attempts == 1
    assert sorted(out) == list(range(6)) and [len(out[i]) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    errors = {d.error for deliveries in out.values() for d in deliveries}
    assert len(errors) == 1 and not any(d.ok or d.permanent for ds in out.values() for d in ds)  # an outage
    try:
        producer.backoff_s = 60.0  # within the window after a failure: at once, with its error
        assert producer.publish("t", [(b"k", b"v")]) == [out[0][0]] and producer.attempts == 1
        producer.backoff_s = 0.0  # past it: a fresh attempt
        again = producer.publish("t", [(b"k", b"v")])
        assert producer.attempts == 2 and not again[0].ok
    finally:
        producer.close()


def test_concurrent_event_posts_and_a_takedown_during_an_outage_share_one_connection_attempt(
    settings: Settings,
) -> None:
    """Through the API: requests needing Kafka while it is unreachable all answer 503 after the one
    attempt in progress (events failed, the takedown event_not_published), not one attempt each in turn."""
    admin = {"Authorization": "Bearer adm"}
    s = down(with_events(settings, admin_tokens=[SecretStr("adm")], served_log=False))
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"request_timeout_ms": 4000})})
    app = create_app(s)
    producer: ApiProducer = app.state.producer
    server = Served(app, free_port()).start()
    answers: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        body = {"events": [ev("song.o", "play", f"o-{name}"), ev("song.o", "clap", f"bad-{name}")]}
        answers[name] = httpx.post(f"{server.url}/v1/events", json=body, headers=AUTH, timeout=120)

    def takedown() -> None:
        answers["takedown"] = httpx.delete(f"{server.url}/v1/songs/song.o", headers=admin, timeout=120)

    try:
        first = threading.Thread(target=post, args=("first",))
        first.start()
        deadline = time.monotonic() + 10
        while not producer._lock.locked() and time.monotonic() < deadline:  # connecting for the first post
            time.sleep(0.01)
        assert producer._lock.locked()
        later = [threading.Thread(target=post, args=(f"p{i}",)) for i in range(3)] + [threading.Thread(target=takedown)]
        for t in later:
            t.start()
        for t in [first, *later]:
            t.join(120)
    finally:
        server.stop()
    assert producer.attempts == 1
    assert sorted(answers) == ["first", "p0", "p1", "p2", "takedown"]
    assert answers["takedown"].status_code == 503 and answers["takedown"].json()["error"] == "event_not_published"
    messages = set()
    for name in ("first", "p0", "p1", "p2"):
        r = answers[name]
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        results = r.json()["results"]
        assert [(x["status"], x["error"]["code"]) for x in results] == [
            ("failed", "not_published"),
            ("rejected", "invalid_schema"),
        ]
        messages.add(results[0]["error"]["message"])
    assert len(messages) == 1  # the one attempt's error


# -- the clients ----------------------------------------------------------------------------------------
@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[Served, Settings]]:
    s = with_events(settings)
    server = Served(create_app(s), free_port()).start()
    yield server, s
    server.stop()


def test_the_async_client_sends_events_to_a_running_api(served: tuple[Served, Settings]) -> None:
    server, s = served
    models = [Engagement(event_id="m-1", song_id="song.m", user_id="u", type="like", ts=datetime.now(UTC))]
    dicts = [ev("song.n", "play", "n-1"), ev("song.n", "play", "m-1"), ev("song.n", "nope", "n-2")]

    async def run() -> EventsResult:
        async with AsyncApexRankClient(server.url, token=TOKEN, timeout_s=10) as client:
            return await client.send_events([*models, *dicts])

    got = asyncio.run(run())
    assert [(r.index, r.event_id, r.status) for r in got.results] == [
        (0, "m-1", "accepted"),
        (1, "n-1", "accepted"),
        (2, "m-1", "duplicate"),
        (3, "n-2", "rejected"),
    ]
    assert got.results[2].duplicate_of == 0 and got.results[3].code == "invalid_schema"
    assert (got.accepted, got.failed, got.count("rejected")) == (2, 0, 1)
    with ApexRankClient(server.url, token=TOKEN, timeout_s=10) as client:  # the sync twin, the same answers
        assert [r.status for r in client.send_events([ev("song.n", "skip", "n-3")]).results] == ["accepted"]
    assert sorted(e.event_id for _, e in on_topic(s, 3)) == ["m-1", "n-1", "n-3"]


def test_the_clients_give_up_with_each_event_failed_when_kafka_stays_down(settings: Settings) -> None:
    s = down(with_events(settings))
    server = Served(create_app(s), free_port()).start()
    batch = [ev("song.x", "play", "x-1"), ev("song.x", "bad", "x-2")]
    try:
        client = ApexRankClient(server.url, token=TOKEN, timeout_s=10, retries=1, backoff_s=0.01)
        with client, pytest.raises(EventsNotPublished) as err:
            client.send_events(batch)

        async def run() -> EventsNotPublished:
            async with AsyncApexRankClient(server.url, token=TOKEN, timeout_s=10, retries=1, backoff_s=0.01) as client:
                with pytest.raises(EventsNotPublished) as aerr:
                    await client.send_events(batch)
                return aerr.value

        for e in (err.value, asyncio.run(run())):
            assert (e.status, e.code) == (503, "events_not_published")
            assert [(r.status, r.code) for r in e.result.results] == [
                ("failed", "not_published"),
                ("rejected", "invalid_schema"),
            ]
    finally:
        server.stop()


def test_send_events_waits_for_the_servers_answer_past_the_read_timeout(settings: Settings) -> None:
    """Kafka unreachable answers after kafka.request_timeout_ms (30 s by default, 4 s here), beyond the
    clients' 2 s read timeout: send_events waits events_timeout_s (40 s) for the per-event answer, so an
    invalid event comes back rejected, not failed (which a caller would send again), as it would after
    giving up with no answer."""
    s = down(with_events(settings))
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"request_timeout_ms": 4000})})
    server = Served(create_app(s), free_port()).start()
    batch = [ev("song.t", "play", "t-1"), ev("song.t", "bad", "t-2")]
    try:
        with ApexRankClient(server.url, token=TOKEN, retries=0) as client, pytest.raises(EventsNotPublished) as err:
            client.send_events(batch)  # the default timeouts: 2 s, and 40 s for events
    finally:
        server.stop()
    assert (err.value.status, err.value.code) == (503, "events_not_published")
    assert [(r.status, r.code) for r in err.value.result.results] == [
        ("failed", "not_published"),
        ("rejected", "invalid_schema"),
    ]


def partly_failing_app(seen: list[list[str]]) -> FastAPI:
    """An events endpoint that fails every event whose id ends in "!" the first time it sees it."""
    app = FastAPI()

    @app.post("/v1/events")
    async def events(request: Request) -> JSONResponse:
        sent = (await request.json())["events"]
        ids = [e["event_id"] for e in sent]
        before = {i for batch in seen for i in batch}
        seen.append(ids)
        results = [
            {"index": n, "event_id": i, "status": "failed" if i.endswith("!") and i not in before else "accepted"}
            for n, i in enumerate(ids)
        ]
        failed = sum(r["status"] == "failed" for r in results)
        return JSONResponse({"results": results, "error": "events_not_published"}, status_code=503 if failed else 202)

    return app


def test_the_clients_send_again_only_the_failed_events() -> None:
    seen: list[list[str]] = []
    server = Served(partly_failing_app(seen), free_port()).start()
    batch = [ev("s", event_id=i) for i in ("a", "b!", "c", "d!")]
    try:
        with ApexRankClient(server.url, retries=2, backoff_s=0.01) as client:
            got = client.send_events(batch)
        assert seen == [["a", "b!", "c", "d!"], ["b!", "d!"]]
        assert [(r.index, r.event_id, r.status) for r in got.results] == [
            (0, "a", "accepted"),
            (1, "b!", "accepted"),
            (2, "c", "accepted"),
            (3, "d!", "accepted"),
        ]
        seen.clear()

        async def run() -> EventsResult:
            async with AsyncApexRankClient(server.url, retries=2, backoff_s=0.01) as client:
                return await client.send_events([ev("s", event_id=i) for i in ("e!", "f")])

        assert [r.status for r in asyncio.run(run()).results] == ["accepted", "accepted"]
        assert seen == [["e!", "f"], ["e!"]]
    finally:
        server.stop()
