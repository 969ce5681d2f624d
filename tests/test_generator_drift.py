"""Issue 17, item 4: each generator's drift against the model's training (ranker.model.drift), and the
``apexrank report generators`` report read from a real score store and embedding store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from consumers.generator_report import drift_flags, generator_rows, print_generators
from indexes import RedisScoreStore
from indexes.base import EmbeddingRecord
from indexes.embedding_index import EmbeddingIndex
from ranker.events import TASKS
from ranker.model.drift import QUANTILES, generator_drift
from ranker.model.train import train_head
from ranker.serving.writer import FeedWriter
from ranker.settings import Settings
from tests.test_policy import record
from tests.test_uncertainty import config, tiny_world


@pytest.fixture
def trained(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A tiny model trained without g-far (whose songs lie far from the rest), with its OOD model."""
    feats, cat = tiny_world(tmp_path, n=90)
    model = train_head(feats, cat, config(holdout_generators=("g-far",), ensemble=2)).model
    return feats, model


def test_the_card_keeps_the_training_generators_and_score_quantiles(trained) -> None:  # type: ignore[no-untyped-def]
    _, model = trained
    training = model.card.training
    assert training is not None and training["generators"] == ["g-a", "g-b"]
    quantiles = training["score_quantiles"]
    assert set(quantiles) == set(TASKS) and all(len(q) == len(QUANTILES) for q in quantiles.values())
    assert all(q == sorted(q) for q in quantiles.values())


def test_a_generator_that_moved_shows_in_every_figure_and_one_like_training_does_not(trained) -> None:  # type: ignore[no-untyped-def]
    feats, model = trained
    near = np.random.default_rng(3).normal(size=(40, *feats.layers.shape[1:])).astype(np.float32)  # as g-a's
    far = near + 4.0  # the same songs, all moved together
    inputs = np.concatenate([near, far])
    names = ["g-a"] * 40 + ["g-new"] * 40
    pred = model.predict_full(inputs)
    assert pred.ood_percentile is not None
    out = {
        d.generator: d
        for d in generator_drift(
            names,
            {t: pred.mean[:, j] for j, t in enumerate(model.tasks)},
            training=model.card.training,
            ood_percentile=pred.ood_percentile,
            ood_flag=pred.ood_percentile > 95,
            inputs=inputs,
            ood=model.ood,
        )
    }
    assert set(out) == {"g-a", "g-new"}
    a, new = out["g-a"], out["g-new"]
    assert (a.seen, new.seen) == (True, False) and a.songs == new.songs == 40
    assert a.mean_shift is not None and new.mean_shift is not None and a.mean_shift < 1.0 < new.mean_shift
    assert a.ood_percentile is not None and new.ood_percentile is not None and new.ood_percentile > a.ood_percentile
    assert new.ood_share is not None and new.ood_share > 0.5
    assert max(new.score_shift.values()) > max(a.score_shift.values())
    assert drift_flags(new.to_dict())[:2] == ["never seen in training", "mean shifted"]
    # without the model's record or an OOD model: counts only, nothing made up
    (bare,) = generator_drift(["g-a"] * 3, {"likes": [1.0, 2.0, np.nan]})
    assert (bare.seen, bare.mean_shift, bare.ood_percentile, bare.score_shift) == (None, None, None, {})


def test_the_report_reads_the_window_from_the_stores(trained, settings: Settings, store: RedisScoreStore) -> None:  # type: ignore[no-untyped-def]
    feats, model = trained
    now = datetime.now(UTC)
    songs = []
    for i, sid in enumerate(feats.song_ids[:30]):
        gen = "g-a" if i < 20 else "g-new"
        song = record(sid, generator=gen, now=now.timestamp() - (0 if i % 10 else 48 * 3600))
        song.extra.update({"ood.pct": 99.0 if gen == "g-new" else 40.0, "ood": gen == "g-new"})
        songs.append(song)
    FeedWriter(settings, store).on_scored(songs, now=now.timestamp())
    layers = np.random.default_rng(4).normal(size=(30, *feats.layers.shape[1:])).astype(np.float32)
    layers[20:] += 4.0  # g-new's songs lie away from the training songs
    index = EmbeddingIndex(settings.index_dir, dim=4, factory="Flat", use_gpu="never")
    try:
        index.add(
            [
                EmbeddingRecord(sid, model.encoder_id, layers[i], np.eye(4, dtype=np.float32)[i % 4], 1, 1)
                for i, sid in enumerate(feats.song_ids[:30])
            ]
        )
    finally:
        index.close()
    body = generator_rows(settings, window_h=24.0, now=now + timedelta(seconds=1), model=model)
    rows = {g["generator"]: g for g in body["generators"]}
    assert body["songs"] == 27  # 3 of the 30 were scored 48 h ago, outside the window
    assert (rows["g-a"]["songs"], rows["g-new"]["songs"]) == (18, 9)
    assert rows["g-a"]["ood_percentile"] == pytest.approx(40.0) and rows["g-new"]["ood_share"] == 1.0
    assert rows["g-new"]["seen"] is False and rows["g-new"]["mean_shift"] > 1.0 > rows["g-a"]["mean_shift"]
    assert print_generators(settings, 24.0, as_json=True) == 0  # the serving model (seeded): counts only


def test_generator_labels_are_capped_so_event_data_cannot_grow_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers import metrics

    monkeypatch.setattr(metrics, "_generators", set())
    monkeypatch.setattr(metrics, "MAX_GENERATOR_LABELS", 2)
    assert [metrics.generator_label(g) for g in ("a", "b", "c", "a", None)] == ["a", "b", "other", "a", "other"]
