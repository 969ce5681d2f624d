"""Issue 17 through the scoring path: the uncertainty fields in a real Redis song hash and in songs.scored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from indexes.base import ScoreStore
from indexes.redis_schema import OOD_FLAG, OOD_PERCENTILE, PRIOR_FIELD, PRIOR_SD_FIELD, SPREAD_FIELD_PREFIX
from ranker.errors import InputError
from ranker.events import TASKS, SongScored
from ranker.model.train import train_head
from ranker.scoring import SongMeta, score_songs
from ranker.settings import Settings
from tests.test_uncertainty import config, tiny_world

UNCERTAINTY = {PRIOR_SD_FIELD, OOD_PERCENTILE, OOD_FLAG} | {SPREAD_FIELD_PREFIX + t for t in TASKS}


def _write_and_read(settings: Settings, store: ScoreStore, scores: list, now: str) -> list[dict[str, str]]:
    store.write_songs([s.record(now) for s in scores], settings.feed.name)
    read = store.read_songs([s.song_id for s in scores])
    assert all(r is not None for r in read)
    return [r.fields for r in read if r is not None]


def test_the_scoring_path_writes_the_uncertainty_fields_into_redis(
    settings: Settings, store: ScoreStore, tmp_path: Path
) -> None:
    feats, cat = tiny_world(tmp_path)
    model = train_head(feats, cat, config(ensemble=3)).model
    layers = np.concatenate([feats.layers[:3], feats.layers[:1] + 60.0])  # the last one far from training
    songs = [SongMeta(f"u{i}", "g-a", "2026-01-06T00:00:00+00:00") for i in range(4)]
    scores = score_songs(settings, model, layers, songs)
    fields = _write_and_read(settings, store, scores, datetime.now(UTC).isoformat())
    for f, sc in zip(fields, scores, strict=True):
        assert set(f) >= UNCERTAINTY
        assert float(f[PRIOR_SD_FIELD]) == pytest.approx(sc.like_rate_sd)
        assert all(float(f[SPREAD_FIELD_PREFIX + t]) >= 0 for t in TASKS)
        assert 0 <= float(f[OOD_PERCENTILE]) <= 100
    # In range the heads disagree; far away they all saturate at the scale's end and agree (sd 0):
    # the reason the OOD flag is there besides the spread.
    assert all(float(f[PRIOR_SD_FIELD]) > 0 for f in fields[:3])
    assert fields[-1][OOD_FLAG] == "1" and float(fields[-1][OOD_PERCENTILE]) == 100.0
    assert fields[0][OOD_FLAG] in {"0", "1"}

    event = scores[-1].event(datetime.now(UTC))
    assert event.schema_version == 2 and event.ood is True and event.spread is not None
    again = SongScored.parse(event.to_bytes())
    assert again == event


def test_a_model_without_them_writes_none_of_the_fields(settings: Settings, store: ScoreStore, tmp_path: Path) -> None:
    feats, cat = tiny_world(tmp_path)
    model = train_head(feats, cat, config(ood=False)).model
    songs = [SongMeta(f"v{i}", "g-a", "2026-01-06T00:00:00+00:00") for i in range(2)]
    scores = score_songs(settings, model, feats.layers[:2], songs)
    fields = _write_and_read(settings, store, scores, datetime.now(UTC).isoformat())
    for f in fields:
        assert PRIOR_FIELD in f and not (UNCERTAINTY & set(f))
    event = json.loads(scores[0].event(datetime.now(UTC)).to_bytes())
    assert event["schema_version"] == 1 and not ({"spread", "like_rate_sd", "ood_percentile", "ood"} & set(event))


def test_songs_scored_version_1_still_parses_and_version_2_fields_need_version_2() -> None:
    v1 = {
        "schema_version": 1,
        "song_id": "s1",
        "model_version": "apex-0123456789ab",
        **dict.fromkeys(TASKS, 3.0),
        "rank_score": 0.5,
        "scored_at": "2026-01-05T00:00:00Z",
        "generator": "suno-v5",
    }
    old = SongScored.parse(json.dumps(v1).encode())
    assert old.schema_version == 1 and old.spread is None and old.ood is None
    with pytest.raises(InputError):
        SongScored.parse(json.dumps({**v1, "ood": True}).encode())
    v2 = {
        **v1,
        "schema_version": 2,
        "spread": {"likes": 1.5},
        "like_rate_sd": 0.01,
        "ood_percentile": 97.0,
        "ood": True,
    }
    new = SongScored.parse(json.dumps(v2).encode())
    assert new.spread == {"likes": 1.5} and new.ood_percentile == 97.0
    with pytest.raises(InputError):
        SongScored.parse(json.dumps({**v2, "spread": {"tempo": 1.0}}).encode())
    with pytest.raises(InputError):
        SongScored.parse(json.dumps({**v2, "schema_version": 3}).encode())
