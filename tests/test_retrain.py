"""Retraining on the real stack: a worse candidate is never promoted; a promotion rescores the feed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from consumers.publish import catalog_events, publish_events
from consumers.retrain import run_once
from consumers.worker import Worker
from indexes.engagement_log import EngagementLog, LoggedEvent
from ranker.model.artifact import resolve_model_dir
from ranker.settings import RetrainSettings, Settings
from ranker.synth import simulate_catalog
from tests.helpers import read_topic
from tests.test_worker import feed, song


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retrain-world")
    return simulate_catalog(out, n_songs=240, seed=11, duration_s=2.0).catalog_path


def engage(settings: Settings, catalog: Path, seed: int = 3) -> None:
    """Plays and likes drawn from each song's true (hidden) like probability, into the real log."""
    table = pq.read_table(catalog).to_pylist()
    rng = np.random.default_rng(seed)
    log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
    events: list[LoggedEvent] = []
    t0 = datetime.now(UTC) - timedelta(hours=1)
    offset = 0
    for row in table:
        plays = int(rng.integers(30, 90))
        likes = int(rng.binomial(plays, min(0.9, row["latent_like_prob"] * 3)))
        for k in range(plays + likes):
            kind = "play" if k < plays else "like"
            events.append(
                LoggedEvent(f"{row['song_id']}-{k}", row["song_id"], f"u{k}", kind, t0, None, None, 0, offset)
            )
            offset += 1
    log.append(events)


def scored_world(settings: Settings, catalog: Path) -> None:
    events = catalog_events(catalog)
    # The cold-start window is measured from created_at: make the songs new.
    now = datetime.now(UTC)
    events = [e.model_copy(update={"created_at": now - timedelta(minutes=i)}) for i, e in enumerate(events)]
    publish_events(settings, events)
    Worker(settings).run(until_idle_s=2.0)
    engage(settings, catalog)


def test_retrain_promotes_a_better_head_rescoring_the_feed_and_never_a_worse_one(
    settings: Settings, world: Path
) -> None:
    settings = settings.model_copy(update={"retrain": RetrainSettings(min_plays=10, epochs=40, margin=0.05)})
    scored_world(settings, world)
    before = feed(settings)
    old_version = song(settings, before[0][0])["model_version"]  # type: ignore[index]

    report = run_once(settings)

    assert report.promoted, report
    assert report.candidate["likes"] >= report.current["likes"] - 0.05
    assert resolve_model_dir(settings.head_dir) is not None
    after = feed(settings)
    assert sorted(s for s, _ in after) == sorted(s for s, _ in before)  # nothing lost or added
    assert [s for s, _ in after] != [s for s, _ in before]  # but the order follows the new model
    rec = song(settings, after[0][0])
    assert rec is not None and rec["model_version"] == report.candidate_version != old_version
    announced = read_topic(settings, settings.kafka.topics.models_promoted, 1)
    assert [m.key for m in announced] == [report.candidate_version.encode()]  # type: ignore[union-attr]

    # A new worker picks the promoted head up.
    assert Worker(settings).model.version == report.candidate_version

    # A deliberately worse candidate (trained on shuffled targets) is not promoted over it.
    settings = settings.model_copy(
        update={"retrain": RetrainSettings(min_plays=10, epochs=15, margin=0.0, warm_start=False)}
    )
    promoted_feed = feed(settings)
    worse = run_once(settings, train_overrides={"shuffle_targets": True, "layer_mix": "mean"})
    assert not worse.promoted, worse
    assert worse.current_version == report.candidate_version and worse.candidate_version is not None
    assert resolve_model_dir(settings.head_dir).name == report.candidate_version  # type: ignore[union-attr]
    assert feed(settings) == promoted_feed
