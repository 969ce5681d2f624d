"""Scores of an untrained head are marked wherever they go: the record, songs.scored, the API.

On the real stack: the worker scores one song with the seeded head the test settings allow
(``model.allow_untrained``), then one with a promoted, trained head; the API serves both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from consumers.publish import publish_events
from consumers.worker import Worker
from indexes import RedisScoreStore
from indexes.base import SongRecord
from indexes.redis_schema import (
    MODEL_OPTIONAL_FIELDS,
    OOD_FLAG,
    OOD_PERCENTILE,
    PRIOR_FIELD,
    PRIOR_SD_FIELD,
    RESERVED_FIELDS,
    SCORE_FIELD_PREFIX,
    SPREAD_FIELD_PREFIX,
    UNTRAINED,
)
from ranker.events import TASKS
from ranker.model.registry import promote
from ranker.serving.api import create_app
from ranker.serving.reader import FeedReader
from ranker.serving.writer import write_scored
from ranker.settings import Settings
from tests.golden.paths import seeded_model
from tests.helpers import event, read_topic, tone


def score_one(settings: Settings, song_id: str, audio: Path) -> str:
    """Publish one song and run the worker until idle; the model version it scored with."""
    publish_events(settings, [event(song_id, tone(audio, seconds=1.5).as_uri())])
    for _ in range(3):  # on a loaded machine the first fetch can come after the idle second: a new worker then
        worker = Worker(settings)
        try:
            version = worker.model.version
            info = {"model_version": version, "encoder": worker.encoder.encoder_id}
            trained = "true" if worker.model.trained else "false"
            assert REGISTRY.get_sample_value("apexrank_model_info", {**info, "trained": trained}) == 1.0
            stats = worker.run(until_idle_s=1.0, until_caught_up=True)
        finally:
            worker.close()
        if stats.messages:
            break
    assert stats.scored == 1 and stats.dead_letters == 0, stats
    return version


def model_songs(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "apexrank_api_model_songs":
                out[(s.labels["model_version"], s.labels["trained"])] = s.value
    return out


def test_an_untrained_heads_scores_are_marked_everywhere_and_a_trained_heads_nowhere(
    settings: Settings, store: RedisScoreStore, tmp_path: Path
) -> None:
    seeded = score_one(settings, "raw-1", tmp_path / "raw.wav")
    assert seeded.startswith("untrained-")
    root = settings.head_dir.parent
    trained = seeded_model(settings, 3)
    promote(root, trained.save_versioned(root))
    assert score_one(settings, "real-1", tmp_path / "real.wav") == trained.version != seeded

    # The record and the event.
    raw, real = store.get_songs(["raw-1", "real-1"])
    assert raw is not None and real is not None
    assert raw[UNTRAINED] == "1" and UNTRAINED not in real
    events = {
        json.loads(m.value)["song_id"]: json.loads(m.value)
        for m in read_topic(settings, settings.kafka.topics.songs_scored, 2)
    }
    assert events["raw-1"]["untrained"] is True and events["real-1"]["untrained"] is False

    # The API: items, the song, /readyz and /metrics.
    with TestClient(create_app(settings)) as client:
        feed = settings.feed.name
        page = client.get(f"/v1/feeds/{feed}").json()["items"]
        ranked = client.post("/v1/rank", json={"candidates": ["raw-1", "real-1"], "feed": feed}).json()["items"]
        brief = client.post("/v1/rank", json={"candidates": ["raw-1", "real-1"], "explain": False}).json()["items"]
        for items in (page, ranked, brief):
            marks: dict[str, Any] = {it["song_id"]: it.get("untrained") for it in items}
            assert marks == {"raw-1": True, "real-1": None}, items  # absent, not false, on trained output
        assert client.get("/v1/songs/raw-1").json()["untrained"] is True
        assert client.get("/v1/songs/real-1").json()["untrained"] is False
        ready = client.get("/readyz").json()["models"]
        assert ready == [
            {"version": v, "songs": 1, "trained": t, "untrained_songs": 0 if t else 1}
            for v, t in sorted([(seeded, False), (trained.version, True)])
        ]
        assert model_songs(client.get("/metrics").text) == {(seeded, "false"): 1.0, (trained.version, "true"): 1.0}


def test_a_rescore_by_a_trained_head_keeps_none_of_the_untrained_heads_fields(
    settings: Settings, store: RedisScoreStore, tmp_path: Path
) -> None:
    """The song's hash, GET /v1/songs and the API's table (followed through the change log) all lose the
    untrained flag, the OOD flag and the spreads when a trained head without them scores the song again."""
    audio = tmp_path / "raw.wav"
    seeded = score_one(settings, "raw-1", audio)
    # The seeded head has no ensemble and no OOD model: its record is given what they would write, through
    # the worker's write, as are engagement counts (the feedback consumer's).
    raw = store.get_song("raw-1")
    assert raw is not None and raw[UNTRAINED] == "1"
    extra: dict[str, Any] = {k: v for k, v in raw.items() if k not in RESERVED_FIELDS}
    extra = {k: v for k, v in extra.items() if not k.startswith(SCORE_FIELD_PREFIX)}
    extra |= {OOD_FLAG: 1, OOD_PERCENTILE: 99.5, PRIOR_SD_FIELD: 0.05, PRIOR_FIELD: 0.02}
    extra |= {SPREAD_FIELD_PREFIX + t: 0.1 for t in TASKS}
    scores = {t: float(raw[SCORE_FIELD_PREFIX + t]) for t in TASKS}
    old = SongRecord(
        "raw-1", seeded, scores, float(raw["rank_score"]), raw["generator"], raw["created_at"], raw["scored_at"], extra
    )
    write_scored(store, settings, [old])
    store.client.hset(store.song_key("raw-1"), mapping={"eng.plays": "4", "eng.likes": "1"})
    before = store.get_song("raw-1")
    assert before is not None

    with TestClient(create_app(settings)) as client:
        reader: FeedReader = client.app.state.reader  # type: ignore[attr-defined]
        feed = settings.feed.name

        def served() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            assert client.portal.call(reader.sync.caught_up, 10.0)  # type: ignore[union-attr]
            table = reader.table
            row = int(table.rows(["raw-1"])[0])
            columns = {
                "untrained": bool(table.untrained[row]),
                "ood": bool(table.ood[row]),
                "sd": float(table.prior_sd[row]),
            }
            (item,) = client.get(f"/v1/feeds/{feed}").json()["items"]
            return client.get("/v1/songs/raw-1").json(), item, columns

        song, item, columns = served()
        assert song["untrained"] is True and song["like_rate"]["ood"] is True and song["like_rate"]["spread"] == 0.05
        assert item["untrained"] is True and item["components"]["ood"] is True
        assert columns == {"untrained": True, "ood": True, "sd": 0.05}

        root = settings.head_dir.parent
        trained = seeded_model(settings, 3)
        promote(root, trained.save_versioned(root))
        assert score_one(settings, "raw-1", audio) == trained.version  # the stored embedding, rescored

        after = store.get_song("raw-1")
        assert after is not None and after["model_version"] == trained.version
        stale = {UNTRAINED, OOD_FLAG, OOD_PERCENTILE, PRIOR_SD_FIELD} | {SPREAD_FIELD_PREFIX + t for t in TASKS}
        assert set(after) == set(before) - stale  # the rest is kept: eng.*, the worker's extras, the new prior
        assert after["eng.plays"] == "4" and after[PRIOR_FIELD] != before[PRIOR_FIELD]
        assert set(MODEL_OPTIONAL_FIELDS) & set(after) == {PRIOR_FIELD}  # the trained head has a target transform

        song, item, columns = served()
        assert song["model_version"] == trained.version and song["untrained"] is False
        assert song["like_rate"]["ood"] is False and song["like_rate"]["spread"] is None
        assert song["like_rate"]["ood_percentile"] is None and song["engagement"]["plays"] == 4
        assert "untrained" not in item and "ood" not in item["components"] and "prior_sd" not in item["components"]
        assert columns["untrained"] is False and columns["ood"] is False and columns["sd"] != columns["sd"]  # NaN
        assert client.get("/readyz").json()["models"] == [
            {"version": trained.version, "songs": 1, "trained": True, "untrained_songs": 0}
        ]
