"""Metrics for every worker stage and structured JSON logs with song ids and offsets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from consumers.logs import JsonFormatter
from consumers.publish import publish_events
from consumers.worker import Worker
from ranker.settings import Settings
from tests.helpers import event, tone


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_worker_metrics_and_json_logs(settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {
        "events": sample("apexrank_worker_events_total"),
        "scored": sample("apexrank_worker_songs_scored_total"),
        "dead": sample("apexrank_worker_dead_letters_total", code="file_not_found"),
        "batches": sample("apexrank_worker_stage_seconds_count", stage="batch"),
        "encode": sample("apexrank_worker_stage_seconds_count", stage="encode"),
    }
    good = [event(f"m-{i}", tone(tmp_path / f"m{i}.wav", seed=i).as_uri()) for i in range(3)]
    publish_events(settings, [*good, event("m-missing", (tmp_path / "nope.wav").as_uri())])
    caplog.set_level(logging.INFO, logger="consumers.worker")
    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)

    assert sample("apexrank_worker_events_total") - before["events"] == 4
    assert sample("apexrank_worker_songs_scored_total") - before["scored"] == 3
    assert sample("apexrank_worker_dead_letters_total", code="file_not_found") - before["dead"] == 1
    assert sample("apexrank_worker_stage_seconds_count", stage="batch") > before["batches"]
    assert sample("apexrank_worker_stage_seconds_count", stage="encode") > before["encode"]
    assert sample("apexrank_index_vectors") == 3

    fmt = JsonFormatter()
    dead = next(r for r in caplog.records if r.getMessage().startswith("dead letter"))
    line = json.loads(fmt.format(dead))
    assert line["song_id"] == "m-missing" and line["error_code"] == "file_not_found"
    assert line["topic"] == settings.kafka.topics.songs_generated and isinstance(line["offset"], int)
    batch = json.loads(fmt.format(next(r for r in caplog.records if r.getMessage().startswith("batch:"))))
    assert batch["level"] == "info" and batch["offsets"] and set(batch["song_ids"]) <= {e.song_id for e in good}
