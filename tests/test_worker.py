"""The scoring worker end to end on the real embedded broker and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf

from consumers import loop
from consumers.publish import publish_events
from consumers.worker import Worker
from indexes import open_score_store
from indexes.base import faiss_id
from indexes.embedding_index import EmbeddingIndex
from ranker.events import TASKS, DeadLetter, SongScored
from ranker.model.artifact import Prediction
from ranker.settings import AudioSettings, Settings, WorkerSettings
from tests.helpers import WavHandler, event, loopback, read_topic, settings_env, tone


def run_worker(settings: Settings, idle_s: float = 2.0) -> Worker:
    worker = Worker(settings)
    worker.run(until_idle_s=idle_s, until_caught_up=True)
    return worker


def feed(settings: Settings) -> list[tuple[str, float]]:
    store = open_score_store(settings.redis.url.get_secret_value(), settings.redis.key_prefix, 5.0)
    try:
        return store.feed_page(settings.feed.name, 0, 100_000)
    finally:
        store.close()


def song(settings: Settings, song_id: str) -> dict[str, str] | None:
    store = open_score_store(settings.redis.url.get_secret_value(), settings.redis.key_prefix, 5.0)
    try:
        return store.get_song(song_id)
    finally:
        store.close()


def index_keys(settings: Settings, dim: int) -> list[int]:
    """Keys in the index as a fresh process would load it; also checks the store agrees."""
    idx = EmbeddingIndex(settings.index_dir, dim=dim, factory=settings.index.factory, use_gpu="never")
    try:
        keys = idx.vector_index.keys().astype(int).tolist()
        assert idx.store.count() == len(keys)
        return keys
    finally:
        idx.close()


def stored_layers(settings: Settings, dim: int, song_ids: list[str]) -> dict[str, np.ndarray]:
    """The pooled layers the embedding store holds for these songs (read back as a fresh process would)."""
    idx = EmbeddingIndex(settings.index_dir, dim=dim, factory=settings.index.factory, use_gpu="never")
    try:
        got = idx.store.get_many(song_ids)
        return {s: got[s].record.layers for s in song_ids if s in got}
    finally:
        idx.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipelined", [False, True])
def test_until_caught_up_ends_the_run_with_everything_published_before_scored(
    settings: Settings, tmp_path: Path, pipelined: bool
) -> None:
    """No idle timeout at all: the run ends only because every partition was read to its end (a run
    that never saw it would hang until the test's timeout). test_feedback checks :func:`caught_up` itself."""
    n = 7
    events = [event(f"cu-{i}", tone(tmp_path / f"cu{i}.wav", freq=200 + 30 * i).as_uri()) for i in range(n)]
    publish_events(settings, events)
    small = settings.worker.model_copy(update={"pipelined": pipelined, "max_poll_records": 2, "group_songs": 2})
    stats = Worker(settings.model_copy(update={"worker": small})).run(until_caught_up=True)
    assert stats.scored == n and sorted(s for s, _ in feed(settings)) == sorted(e.song_id for e in events)


def test_idle_clock_starts_when_partitions_are_first_assigned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll that joins the group can outlast ``until_idle_s`` by itself (CI saw a worker exit with
    nothing read: its first assigned, empty poll came 1 s after the clock last started). Idle time
    counts from the first poll that finds partitions assigned."""
    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    clock = loop.IdleClock(1.0)
    assert not clock.expired(assigned=False)  # joining
    now[0] += 5.0  # the joining poll took 5 s, and returned nothing
    assert not clock.expired(assigned=True)  # the clock starts here
    now[0] += 0.9
    assert not clock.expired(assigned=True)
    now[0] += 0.2
    assert clock.expired(assigned=True)
    assert not clock.expired(assigned=False)  # a rebalance takes the partitions away: joining again
    now[0] += 5.0
    assert not clock.expired(assigned=True)


def test_valid_song_is_scored_once_everywhere(settings: Settings, tmp_path: Path) -> None:
    events = [event(f"ok-{i}", tone(tmp_path / f"ok{i}.wav", freq=220 * (i + 1)).as_uri()) for i in range(3)]
    publish_events(settings, events)
    worker = run_worker(settings)
    assert worker.stats.scored == 3 and worker.stats.dead_letters == 0

    ranked = feed(settings)
    assert sorted(s for s, _ in ranked) == ["ok-0", "ok-1", "ok-2"]
    rec = song(settings, "ok-1")
    assert rec is not None
    assert rec["generator"] == "suno-v5" and rec["model_version"].startswith("untrained-seed42")
    for task in TASKS:
        assert f"score.{task}" in rec
    assert 0 <= float(rec["score.streams"]) <= 100 and 1 <= float(rec["score.coherence"]) <= 5

    # Each song's stored scores are the worker's model run on that song's own stored embedding
    # (a worker that mixed up the songs of a batch would store another song's scores).
    dim = worker.encoder.vector_dim
    ids = [f"ok-{i}" for i in range(3)]
    layers = stored_layers(settings, dim, ids)
    assert sorted(layers) == ids
    expected = worker.model.predict(np.stack([layers[s] for s in ids]))
    stored = {s: song(settings, s) for s in ids}
    for sid, row in zip(ids, expected, strict=True):
        rec = stored[sid]
        assert rec is not None
        for task, value in zip(worker.model.tasks, row, strict=True):
            assert float(rec[f"score.{task}"]) == pytest.approx(float(value), rel=1e-6), (sid, task)
    # ... and the songs' scores differ by far more than that tolerance, so a swap would show.
    for a in range(3):
        for b in range(a):
            assert (np.abs(expected[a] - expected[b]) / np.abs(expected[b])).max() > 1e-4, (a, b)

    keys = index_keys(settings, dim)
    assert sorted(keys) == sorted(faiss_id(f"ok-{i}") for i in range(3))

    scored = [
        SongScored.model_validate_json(m.value) for m in read_topic(settings, settings.kafka.topics.songs_scored, 3)
    ]
    assert sorted(s.song_id for s in scored) == ["ok-0", "ok-1", "ok-2"]
    assert {m.key for m in read_topic(settings, settings.kafka.topics.songs_scored, 3)} == {
        b"ok-0",
        b"ok-1",
        b"ok-2",
    }


def test_duplicate_event_changes_nothing(settings: Settings, tmp_path: Path) -> None:
    ev = event("dup-1", tone(tmp_path / "d.wav").as_uri())
    publish_events(settings, [ev, ev])
    run_worker(settings)
    first = song(settings, "dup-1")
    publish_events(settings, [ev])
    worker = run_worker(settings)
    assert worker.stats.reused_embeddings == 1
    assert song(settings, "dup-1") == first
    assert [s for s, _ in feed(settings)] == ["dup-1"]
    assert index_keys(settings, worker.encoder.vector_dim) == [faiss_id("dup-1")]


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    WavHandler.wav = tone(tmp_path / "served.wav").read_bytes()
    with loopback(WavHandler) as url:
        yield url


def test_bad_input_goes_to_dead_letters_and_the_worker_keeps_going(
    settings: Settings, tmp_path: Path, http_server: str
) -> None:
    settings = settings.model_copy(
        update={
            "audio": AudioSettings(
                max_bytes=400_000, fetch_timeout_s=1.0, max_duration_s=3.0, allow_private_networks=True
            ),
            # One try: the slow server's timeout is transient and would otherwise be retried (test_retries.py).
            "worker": WorkerSettings(max_poll_records=4, fetch_max_attempts=1),
        }
    )
    sr = 24_000
    big = tmp_path / "big.wav"
    sf.write(big, np.zeros(sr * 10, dtype=np.float32) + 0.1, sr)  # 10 s x 2 bytes > 400 kB
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(os.urandom(5000))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), sr)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(sr * 2, dtype=np.float32), sr)
    short = tone(tmp_path / "short.wav", seconds=0.5)
    long = tone(tmp_path / "long.wav", seconds=6.0)
    cases = {
        "missing": ("file_not_found", (tmp_path / "nope.wav").as_uri()),
        "ftp": ("unsupported_uri_scheme", "ftp://example.org/a.wav"),
        "http404": ("http_error", f"{http_server}/missing.wav"),
        "httpslow": ("fetch_timeout", f"{http_server}/slow.wav"),
        "big": ("too_large", big.as_uri()),
        "garbage": ("undecodable_audio", garbage.as_uri()),
        "empty": ("empty_audio", empty.as_uri()),
        "silent": ("silent_audio", silent.as_uri()),
        "short": ("too_short", short.as_uri()),
    }
    good = [event(f"good-{i}", tone(tmp_path / f"g{i}.wav", seed=i).as_uri()) for i in range(3)]
    bad = [event(name, uri) for name, (_, uri) in cases.items()]
    raw = [b"{not json", json.dumps({"song_id": "x y", "generator": "g"}).encode(), b"\xff\xfe\x00binary"]
    # Interleave so that poison messages sit between good ones in every partition.
    mixed = [
        good[0],
        *bad[:4],
        good[1],
        *bad[4:],
        event("long", long.as_uri()),
        event("web", f"{http_server}/ok.wav"),
    ]
    publish_events(settings, [*mixed, good[2]], raw=raw)

    worker = run_worker(settings, idle_s=3.0)

    letters = [
        DeadLetter.model_validate_json(m.value) for m in read_topic(settings, settings.kafka.topics.dead_letter, 12)
    ]
    by_key = {d.key: d for d in letters if d.key}
    for name, (code, _) in cases.items():
        assert by_key[name].error_code == code, (name, by_key[name].message)
        assert by_key[name].source_topic == settings.kafka.topics.songs_generated
        assert by_key[name].message
    assert "gave up after 1 attempt" in by_key["httpslow"].message  # transient, but no retry was allowed
    assert "attempt" not in by_key["http404"].message  # a 404 is permanent: never retried
    keyless = sorted(d.error_code for d in letters if not d.key)
    assert keyless == ["invalid_json", "invalid_json", "invalid_schema"]
    binary = next(d for d in letters if d.original_encoding == "base64")
    assert binary.original_bytes() == b"\xff\xfe\x00binary"
    assert len(letters) == 12

    scored = {s for s, _ in feed(settings)}
    assert scored == {"good-0", "good-1", "good-2", "long", "web"}
    long_rec = song(settings, "long")
    assert long_rec is not None and long_rec["truncated"] == "1"
    assert float(long_rec["scored_duration_s"]) == pytest.approx(3.0, abs=0.01)
    assert worker.stats.dead_by_code["file_not_found"] == 1


def test_worker_refuses_to_start_without_mert_weights(settings: Settings, tmp_path: Path) -> None:
    from ranker.errors import ConfigError
    from ranker.settings import ModelSettings

    s = settings.model_copy(
        update={
            "encoder": "mert",
            "model": ModelSettings(mert_model=str(tmp_path / "no-weights"), offline=True),
        }
    )
    with pytest.raises(ConfigError, match="APEXRANK_ENCODER=logmel"):
        Worker(s)


def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(settings: Settings, tmp_path: Path) -> None:
    n = 60
    events = [
        event(f"k-{i:03d}", tone(tmp_path / f"k{i}.wav", seconds=8.0, freq=110 + 7 * i, seed=i).as_uri())
        for i in range(n)
    ]
    publish_events(settings, events)
    env = {
        **os.environ,
        **settings_env(settings),
        "APEXRANK_WORKER__MAX_POLL_RECORDS": "4",
        "APEXRANK_WORKER__GROUP_SONGS": "4",  # the pipelined worker (the default) writes in groups of 4 too
        "APEXRANK_INDEX__SNAPSHOT_EVERY_SONGS": "7",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    r = redis.Redis.from_url(settings.redis.url.get_secret_value())
    feed_key = next(iter(r.scan_iter(f"{settings.redis.key_prefix}:feed:*")), None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        feed_key = feed_key or next(iter(r.scan_iter(f"{settings.redis.key_prefix}:feed:*")), None)
        if feed_key is not None and r.zcard(feed_key) >= 10:
            break
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert feed_key is not None
    done_at_kill = r.zcard(feed_key)
    assert 10 <= done_at_kill < n, "the kill must land while work is in flight"

    worker = run_worker(settings, idle_s=3.0)
    ids = [f"k-{i:03d}" for i in range(n)]
    assert sorted(s for s, _ in feed(settings)) == ids
    assert all(song(settings, i) is not None for i in ids)
    keys = index_keys(settings, worker.encoder.vector_dim)
    assert len(keys) == n and sorted(keys) == sorted(faiss_id(i) for i in ids)


@pytest.mark.parametrize("pipelined", [False, True])
def test_sigterm_finishes_the_batch_in_hand_commits_and_exits(
    settings: Settings, tmp_path: Path, pipelined: bool
) -> None:
    """The batch in hand (pipelined: every song already polled) is written and committed before the worker exits."""
    from tests.test_faults import committed_total

    n = 40
    events = [event(f"t-{i:03d}", tone(tmp_path / f"t{i}.wav", seconds=8.0, seed=i).as_uri()) for i in range(n)]
    publish_events(settings, events)
    small = {
        "APEXRANK_WORKER__MAX_POLL_RECORDS": "4",
        "APEXRANK_WORKER__GROUP_SONGS": "4",
        "APEXRANK_WORKER__PIPELINE_SONGS": "12",
    }
    env = {**os.environ, **settings_env(settings), **small, "APEXRANK_WORKER__PIPELINED": json.dumps(pipelined)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(feed(settings)) < 4:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    stats = json.loads(out.decode().strip().splitlines()[-1])
    scored = len(feed(settings))
    assert 4 <= scored < n, "SIGTERM must land while work remains"
    assert stats["messages"] == stats["scored"] == scored
    # Everything written was committed, and nothing was committed that was not written. Pipelined, the
    # groups finish out of poll order: stopping after the group in hand could commit none of them.
    assert committed_total(settings) == scored


def test_a_batch_holds_at_most_its_audio_budget(settings: Settings, tmp_path: Path) -> None:
    """Songs past ``max_batch_audio_bytes`` wait for the encoder; the scores do not change."""
    from consumers.loop import Message

    settings = settings.model_copy(
        update={
            "audio": settings.audio.model_copy(update={"max_duration_s": 3.0}),
            "worker": settings.worker.model_copy(update={"max_batch_audio_bytes": 1 << 20}),
        }
    )
    events = [event(f"cap-{i}", tone(tmp_path / f"c{i}.wav", freq=200 + 50 * i).as_uri()) for i in range(8)]
    messages = [Message("t", 0, i, e.song_id.encode(), e.to_bytes()) for i, e in enumerate(events)]
    worker = Worker(settings)
    try:
        per_song = worker.pipeline.song_audio_bytes()
        assert 3 * per_song <= 1 << 20 < 4 * per_song  # three worst cases fit; 2 s songs let a fourth in
        capped, _ = worker.pipeline.process(messages)
        worker.pipeline.settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update={"max_batch_audio_bytes": 1 << 30})}
        )
        whole, _ = worker.pipeline.process(messages)
    finally:
        worker.close()
    assert capped.audio_waves == 2 and whole.audio_waves == 1
    assert 0 < capped.peak_audio_bytes <= 1 << 20 < whole.peak_audio_bytes
    assert [s.song_id for s in capped.scored] == [e.song_id for e in events]
    assert [s.model_dump(exclude={"scored_at"}) for s in capped.scored] == [
        s.model_dump(exclude={"scored_at"}) for s in whole.scored
    ]


def test_worker_refuses_unconfined_file_uris_outside_development(settings: Settings, tmp_path: Path) -> None:
    from ranker.errors import ConfigError

    production = settings.model_copy(update={"dev_mode": False})
    with pytest.raises(ConfigError, match="APEXRANK_AUDIO__FILE_ROOT"):
        Worker(production)
    rooted = production.model_copy(update={"audio": production.audio.model_copy(update={"file_root": tmp_path})})
    Worker(rooted).close()  # a root makes file:// safe to allow
    http_only = production.model_copy(
        update={"audio": production.audio.model_copy(update={"allowed_schemes": ["http", "https"]})}
    )
    Worker(http_only).close()


def test_a_song_the_model_scores_non_finite_is_dead_lettered_alone(settings: Settings, tmp_path: Path) -> None:
    """A NaN from the head cannot be stored or published: that song is dead-lettered, the batch goes on."""
    from consumers.loop import Message
    from ranker.errors import ErrorCode

    events = [event(f"nf-{i}", tone(tmp_path / f"nf{i}.wav", freq=300 + 40 * i).as_uri()) for i in range(3)]
    messages = [Message("t", 0, i, e.song_id.encode(), e.to_bytes()) for i, e in enumerate(events)]
    worker = Worker(settings)
    try:
        real_predict = worker.pipeline.model.predict_full

        def predict_full(layers: np.ndarray, **kw: Any) -> Prediction:
            full = real_predict(layers, **kw)
            mean = np.array(full.mean, copy=True)
            mean[1, 0] = np.nan  # the second song of the batch
            return replace(full, mean=mean)

        worker.pipeline.model.predict_full = predict_full  # type: ignore[method-assign]
        result, write = worker.pipeline.process(messages)
        write()
    finally:
        worker.close()
    assert [s.song_id for s in result.scored] == ["nf-0", "nf-2"]
    assert [(d.key, d.error_code) for d in result.dead] == [("nf-1", ErrorCode.INTERNAL_ERROR)]
    assert song(settings, "nf-1") is None and song(settings, "nf-2") is not None


def test_worker_refuses_an_untrained_head_unless_allowed(settings: Settings) -> None:
    """Without a promoted head the worker would score with a random one: it says how to get a real one."""
    from ranker.errors import ConfigError
    from ranker.model.registry import promote
    from tests.golden.paths import seeded_model

    s = settings.model_copy(update={"model": settings.model.model_copy(update={"allow_untrained": False})})
    with pytest.raises(ConfigError) as refused:
        Worker(s)
    for way in ("apexrank train", "apexrank import-released", "APEXRANK_MODEL__ALLOW_UNTRAINED=true"):
        assert way in str(refused.value)
    root = s.head_dir.parent
    promote(root, seeded_model(s, 3).save_versioned(root))  # a head with a training record: it starts
    worker = Worker(s)
    try:
        assert worker.model.trained
    finally:
        worker.close()
