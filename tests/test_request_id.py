"""Engagement events may carry the request_id of the response that showed the song (issue 16, item 5):
the contract checks it, and the Parquet engagement log keeps it beside the position."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consumers.feedback import FeedbackConsumer
from consumers.loop import Message
from indexes.engagement_log import SCHEMA, EngagementLog
from ranker.errors import InputError
from ranker.events import Engagement
from ranker.settings import Settings


def _event(event_id: str, **kw: object) -> Engagement:
    return Engagement(
        event_id=event_id,
        song_id="s1",
        user_id="u1",
        type="play",
        ts=datetime.now(UTC),
        **kw,  # type: ignore[arg-type]
    )


def test_the_contract_takes_a_request_id_and_refuses_a_malformed_one() -> None:
    ev = Engagement.parse(_event("e1", request_id="req-7f3a.1", position=3).to_bytes())
    assert ev.request_id == "req-7f3a.1" and ev.position == 3
    assert Engagement.parse(_event("e2").to_bytes()).request_id is None  # optional
    for bad in ("has space", "x" * 65, ""):
        raw = json.dumps({**json.loads(_event("e3").to_bytes()), "request_id": bad}).encode()
        with pytest.raises(InputError):
            Engagement.parse(raw)


def test_the_engagement_log_keeps_each_events_request_id(settings: Settings) -> None:
    topic = settings.kafka.topics.engagement
    events = [_event("e1", request_id="req-1", position=0), _event("e2", position=4), _event("e3", request_id="req-2")]
    feedback = FeedbackConsumer(settings)
    try:
        feedback.process([Message(topic, 0, i, b"s1", e.to_bytes()) for i, e in enumerate(events)])
    finally:
        feedback.counters.close()
    table = EngagementLog(settings.engagement_log_dir, topic).read()
    rows = sorted(zip(*(table.column(c).to_pylist() for c in ("event_id", "request_id", "position")), strict=True))
    assert rows == [("e1", "req-1", 0), ("e2", None, 4), ("e3", "req-2", None)]


def test_log_files_written_before_the_column_read_back_with_nulls(tmp_path: Path) -> None:
    old = pa.schema([f for f in SCHEMA if f.name != "request_id"])
    day = tmp_path / "day=2026-01-01"
    day.mkdir()
    rows = {
        "event_id": ["e1"],
        "song_id": ["s1"],
        "user_id": ["u1"],
        "type": ["like"],
        "ts": [datetime(2026, 1, 1, tzinfo=UTC)],
        "feed": [None],
        "position": [2],
        "partition": [0],
        "offset": [0],
    }
    pq.write_table(pa.table(rows, schema=old), day / "engagement-p0-o0-0.parquet")
    table = EngagementLog(tmp_path, "engagement").read()
    assert table.column("request_id").to_pylist() == [None] and table.column("position").to_pylist() == [2]


def test_every_feed_and_rank_response_has_its_own_request_id(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from ranker.serving.api import create_app

    with TestClient(create_app(settings)) as client:
        pages = [client.get(f"/v1/feeds/{settings.feed.name}", params={"limit": 5}) for _ in range(2)]
        ranked = client.post("/v1/rank", json={"candidates": ["s1", "s2"]})
    ids = []
    for r in [*pages, ranked]:
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        assert r.headers["X-Request-ID"] == rid and len(rid) == 32
        Engagement.parse(_event("e9", request_id=rid).to_bytes())  # an engagement event can name it
        ids.append(rid)
    assert len(set(ids)) == 3
