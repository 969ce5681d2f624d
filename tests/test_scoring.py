"""The one scoring path (ranker.scoring) and the encoder spec that needs no weights."""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from consumers.retrain import current_model, run_once
from indexes.redis_schema import UNTRAINED
from ranker.encoders import Encoder, EncoderSpec, build_encoder, encoder_spec, pool_song
from ranker.encoders.logmel import LogMelEncoder
from ranker.errors import ConfigError
from ranker.events import TASKS
from ranker.model.artifact import ScoringModel
from ranker.model.head import HeadConfig
from ranker.model.targets import TargetTransform
from ranker.scoring import (
    NON_FINITE,
    SongMeta,
    audio_extra,
    encode_songs,
    load_current_model,
    score_predictions,
    song_vector,
)
from ranker.serving.state import PRIOR_FIELD, cold_start_quality, model_like_rate
from ranker.settings import ModelSettings, RetrainSettings, Settings
from ranker.synth import simulate_catalog
from tests.test_encoders import _save_tiny, _to_mert_layout, mert
from tests.test_retrain import scored_world

POISON, NAN = 99.0, -99.0  # a segment starting with this sample makes the fake encoder raise / give NaN


class FakeEncoder(Encoder):
    """Features from the segment's samples; raises on a poison segment, NaN on a marked one."""

    name = "fake"
    encoder_id = "fake-v1"
    sample_rate = 24_000
    n_layers = 2
    dim = 3

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(segments))
        if any(s[0] == POISON for s in segments):
            raise RuntimeError("poison at 0x7f00deadbeef")
        feats = np.zeros((len(segments), self.n_layers, self.dim), dtype=np.float32)
        for i, s in enumerate(segments):
            feats[i] = np.nan if s[0] == NAN else np.outer([1.0, 2.0], s[:3])
        return feats, np.array([len(s) for s in segments], dtype=np.int64)


def segs(*firsts: float) -> list[np.ndarray]:
    """Segments of one song (4 then 3 samples), the first sample of each given."""
    return [np.array([f, 1.0 + k, 2.0, 3.0], dtype=np.float32)[: 4 - k] for k, f in enumerate(firsts)]


def test_encode_songs_batches_across_songs_and_pools_each_song() -> None:
    enc = FakeEncoder()
    songs = [segs(1.0, 2.0), segs(5.0), segs(3.0, 4.0)]
    out = encode_songs(enc, songs)
    assert enc.calls == [5]  # one batch for the three songs
    for song, got in zip(songs, out, strict=True):
        feats, frames = FakeEncoder().encode(song)
        assert got.ok and got.error is None and got.exception is None
        np.testing.assert_array_equal(got.layers, pool_song(feats, frames))
        np.testing.assert_array_equal(got.features, feats)
        assert (got.n_segments, got.n_frames) == (len(song), int(frames.sum()))
        assert got.vector is not None and got.layers is not None
        assert np.linalg.norm(got.vector) == pytest.approx(1.0)
        np.testing.assert_array_equal(got.vector, song_vector(enc, got.layers))


def test_a_poison_song_fails_alone_and_non_finite_features_are_refused() -> None:
    enc = FakeEncoder()
    songs = [segs(1.0, 2.0), segs(1.0, POISON), segs(NAN, 3.0), segs(4.0)]
    batch_mates = encode_songs(FakeEncoder(), [songs[0], songs[3]])
    out = encode_songs(enc, songs)
    assert enc.calls == [7, 2, 2, 2, 1]  # the batch, then one song at a time
    assert [o.ok for o in out] == [True, False, False, True]
    assert out[1].error == "encoder failed: RuntimeError"  # the type only: no message, no heap address
    assert isinstance(out[1].exception, RuntimeError) and out[1].layers is None
    assert out[2].error == NON_FINITE and out[2].exception is None and out[2].layers is None
    for alone, batched in zip(batch_mates, (out[0], out[3]), strict=True):
        np.testing.assert_array_equal(alone.layers, batched.layers)  # the rest go on, unchanged
    # Non-finite in a batch that did not raise: only that song fails.
    out = encode_songs(FakeEncoder(), [segs(1.0, 2.0), segs(NAN)])
    assert [o.error for o in out] == [None, NON_FINITE]


class _Held:
    """Stands for the tensors an encode holds while it runs."""


class OutOfMemoryEncoder(FakeEncoder):
    """Out of device memory for any call of more than ``fits`` segments; records, per call, whether
    what an earlier failed call held is still alive, and when the allocator's cache was emptied."""

    def __init__(self, fits: int, events: list[str]) -> None:
        super().__init__()
        self.fits, self.events = fits, events
        self.held: list[weakref.ref[_Held]] = []

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        alive = sum(r() is not None for r in self.held)
        self.events.append(f"encode {len(segments)}, {alive} held")
        held = _Held()
        self.held.append(weakref.ref(held))
        if len(segments) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().encode(segments)


def test_a_device_out_of_memory_frees_the_cache_and_is_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch ran out of device memory: what it held is let go and the allocator's cache emptied
    before the songs go one at a time; a song that still does not fit is marked out of memory (the
    worker tries it again later), unlike a song the encoder fails on."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    enc = OutOfMemoryEncoder(fits=2, events=events)
    out = encode_songs(enc, [segs(1.0, 2.0), segs(1.0, 2.0, 3.0), segs(4.0)])
    assert events == [
        "encode 6, 0 held",
        "empty_cache",
        "encode 2, 0 held",  # the batch's frames were let go before the songs went alone
        "encode 3, 0 held",
        "empty_cache",
        "encode 1, 0 held",  # so were the frames of the song that did not fit
    ]
    assert [o.ok for o in out] == [True, False, True]
    assert [o.out_of_memory for o in out] == [False, True, False]
    assert out[1].error == "encoder failed: OutOfMemoryError" and out[1].layers is None
    np.testing.assert_array_equal(out[0].layers, encode_songs(FakeEncoder(), [segs(1.0, 2.0)])[0].layers)
    # Any other failure is the song's own: not out of memory, and no cache to empty.
    events.clear()
    poisoned = encode_songs(FakeEncoder(), [segs(POISON)])[0]
    assert not poisoned.ok and not poisoned.out_of_memory and events == []


def seeded(tasks: tuple[str, ...] = TASKS) -> ScoringModel:
    head = HeadConfig(input_dim=3, n_layers=2, tasks=tasks)
    return ScoringModel.from_seed(3, 1, "fake-v1", n_layers=2, layers=None, head_config=head)


def _model_with_transform() -> ScoringModel:
    rng = np.random.default_rng(0)
    streams = rng.lognormal(6, 1.5, 2000).round()
    likes = (streams * rng.beta(2, 30, 2000)).round()
    transform = TargetTransform.fit({"streams": streams, "likes": likes}).to_dict()
    return seeded().with_target_transform(transform)


def test_scores_carry_the_prior_they_were_ranked_with(settings: Settings) -> None:
    model = _model_with_transform()
    layers = np.random.default_rng(1).normal(size=(3, 2, 3)).astype(np.float32)
    created = datetime(2026, 5, 1, tzinfo=UTC).isoformat()
    songs = [SongMeta(f"s{i}", "gen", created) for i in range(3)]
    scored = score_predictions(settings, model, model.predict(layers), songs)
    for s in scored:
        rate = model_like_rate(model.target_transform, s.scores, "gen", created)
        assert rate is not None and s.like_rate == rate
        assert s.rank_score == cold_start_quality(settings, s.scores, rate)
        rec = s.record("2026-05-02T00:00:00+00:00", {"n_segments": 2})
        assert not model.trained  # a seeded head: its record says so
        assert rec.extra == {"n_segments": 2, PRIOR_FIELD: rate, UNTRAINED: 1}
        # what writing used to add: the rate of the record's own scores, generator and creation time
        assert rec.extra[PRIOR_FIELD] == model_like_rate(
            model.target_transform, rec.scores, rec.generator, rec.created_at
        )
        assert list(rec.scores) == list(TASKS) and rec.model_version == model.version
        event = s.event(datetime(2026, 5, 2, tzinfo=UTC), truncated=True)
        assert event.truncated and event.rank_score == s.rank_score and event.likes == s.scores["likes"]


def test_a_popularity_only_head_leaves_aesthetics_at_the_midpoint(settings: Settings) -> None:
    model = seeded(("streams", "likes"))
    preds = model.predict(np.ones((1, 2, 3), np.float32))
    (s,) = score_predictions(settings, model, preds, [SongMeta("a", "g", datetime.now(UTC).isoformat())])
    assert {t: s.scores[t] for t in TASKS if t not in model.tasks} == dict.fromkeys(TASKS[2:], 3.0)
    assert s.like_rate is None and PRIOR_FIELD not in s.record("x").extra


def test_audio_extra_without_audio() -> None:
    assert audio_extra(3, None, "t", ["a", "b"]) == {"n_segments": 3, "title": "t", "tags": "a,b"}


# -- the encoder spec ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MERT checkpoint with weights, and a directory of the same name with its config.json only."""
    root = tmp_path_factory.mktemp("mert-spec")
    hf = root / "hf"
    _save_tiny(hf)
    full = root / "full" / "tiny-mert"
    full.parent.mkdir()
    _to_mert_layout(hf, full)
    config_only = root / "config-only" / "tiny-mert"
    config_only.mkdir(parents=True)
    (config_only / "config.json").write_text((full / "config.json").read_text())
    return {"full": full, "config_only": config_only, "hf": hf}


def mert_settings(path: Path, **kw: Any) -> Settings:
    return Settings(encoder="mert", model=ModelSettings(mert_model=str(path), device="cpu", **kw))


def test_encoder_spec_equals_the_built_encoders(tiny_mert: dict[str, Path]) -> None:
    logmel = Settings(encoder="logmel", model=ModelSettings(logmel_n_mels=24))
    assert encoder_spec(logmel) == build_encoder(logmel).spec == LogMelEncoder(logmel.model).spec
    assert encoder_spec(logmel) == EncoderSpec("logmel", "logmel-v1-n24-sr24000", 24_000, 4, 24, 48, None)
    for path in (tiny_mert["full"], tiny_mert["hf"]):
        for layers in ([2, 5, 8, 12], [0, 12]):
            s = mert_settings(path, layers=layers)
            spec = encoder_spec(s)
            assert spec == build_encoder(s).spec == mert(path, layers=layers).spec
            assert spec.layers == tuple(layers) and spec.dim == spec.vector_dim == 32
    # No weights needed; what the encoder refuses, the spec refuses too.
    only = encoder_spec(mert_settings(tiny_mert["config_only"]))
    assert only == encoder_spec(mert_settings(tiny_mert["full"]))
    with pytest.raises(ConfigError, match="no weights"):
        build_encoder(mert_settings(tiny_mert["config_only"]))
    with pytest.raises(ConfigError, match="LAYERS"):
        encoder_spec(mert_settings(tiny_mert["config_only"], layers=[2, 13]))


def test_encoder_spec_of_a_hub_id_reads_only_its_config(
    tiny_mert: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--apexrank-tests--tiny-mert"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "snapshots" / rev / "config.json").write_text((tiny_mert["full"] / "config.json").read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = mert_settings(Path("apexrank-tests/tiny-mert"), offline=True)  # never the network
    spec = encoder_spec(settings)
    assert spec.encoder_id == "mert:apexrank-tests/tiny-mert:layers=2,5,8,12" and spec.dim == 32
    with pytest.raises(ConfigError, match="found no weights"):
        build_encoder(settings)


# -- retraining never loads the encoder ----------------------------------------------------------


def test_retrain_with_mert_needs_no_weights(
    settings: Settings, tiny_mert: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = simulate_catalog(tmp_path / "world", n_songs=40, seed=5, duration_s=2.0).catalog_path
    scoring = settings.model_copy(
        update={
            "encoder": "mert",
            "model": ModelSettings(mert_model=str(tiny_mert["full"]), device="cpu", allow_untrained=True),
            "retrain": RetrainSettings(min_plays=10, epochs=5, margin=0.0, off_policy_gate=False, rescore_grace_s=0.0),
        }
    )
    scored_world(scoring, world)  # the worker, with the weights, fills the embedding store and Redis

    def no_weights(*_: Any, **__: Any) -> Any:
        raise AssertionError("retrain loaded MERT weights")

    monkeypatch.setattr("ranker.encoders.mert.load_hubert", no_weights)
    retraining = scoring.model_copy(update={"model": ModelSettings(mert_model=str(tiny_mert["config_only"]))})
    current = current_model(retraining)
    assert current.encoder_id == "mert:tiny-mert:layers=2,5,8,12" and current.input_dim == 32
    assert current.version == load_current_model(scoring, encoder_spec(scoring)).version

    report = run_once(retraining)

    assert report.current_version == current.version and report.n_train > 0
    assert json.dumps(report.to_dict(), default=str)
