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
from indexes.redis_schema import UNTRAINED
from ranker.model.registry import promote
from ranker.serving.api import create_app
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
