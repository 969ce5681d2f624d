"""The pipelined worker (consumers.worker_stages): commits stay behind every unwritten song when
groups finish out of poll order, in the tracker alone and across a SIGKILL on the real stack; a
retry never supersedes a newer event; a device out of memory is retried, not dead-lettered; a device
fault stops the worker uncommitted; a store read failing at admission is retried."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from consumers.loop import Message
from consumers.publish import publish_events
from consumers.retries import ATTEMPTS, LAST_ERROR, NOT_BEFORE_MS, ORIGIN
from consumers.worker import Worker
from consumers.worker_stages import CommitTracker, StagedScoring
from indexes import ScoreStore
from ranker.encoders import Encoder
from ranker.errors import DeviceFault, ErrorCode
from ranker.events import DeadLetter
from ranker.scoring import is_device_fault, is_out_of_memory
from ranker.settings import AudioSettings, Settings, WorkerSettings
from tests.helpers import WavHandler, event, loopback, settings_env, tone, wait_for
from tests.test_faults import committed_total
from tests.test_retries import headers, records
from tests.test_worker import feed, index_keys, run_worker


def _msgs(topic: str, partition: int, offsets: list[int]) -> list[Message]:
    return [Message(topic, partition, o, None, b"") for o in offsets]


def test_commit_tracker_never_passes_a_message_in_flight() -> None:
    tracker = CommitTracker()
    a = _msgs("t", 0, [10, 11, 12, 13, 14])
    b = _msgs("t", 1, [0, 1])
    tracker.add(a + b)
    assert tracker.committable() == {("t", 0): 10, ("t", 1): 0}
    tracker.done([a[3], a[4], b[1]])  # the later songs finish first
    assert tracker.committable() == {("t", 0): 10, ("t", 1): 0}
    tracker.done([a[0], a[2]])
    assert tracker.committable() == {("t", 0): 11, ("t", 1): 0}
    tracker.done([a[1], b[0]])
    assert tracker.committable() == {("t", 0): 15, ("t", 1): 2}
    # An offset read twice (a seek back) is in flight until both copies finish.
    again = _msgs("t", 0, [14])
    tracker.add(again + again)
    tracker.done(again)
    assert tracker.committable()[("t", 0)] == 14
    tracker.done(again)
    assert tracker.committable()[("t", 0)] == 15
    # An emptied broker: the partition is read again from 0, and the offsets before the seek no longer count;
    # what was committed before is committed again (the broker lost it), even where the figure is the same.
    tracker.committed(tracker.due())
    assert tracker.due() == {}
    restart = _msgs("t", 0, [0, 1, 2])
    tracker.add(restart)
    tracker.done(restart)
    assert tracker.committable()[("t", 0)] == 3
    tracker.committed({("t", 0): 3})
    assert tracker.due() == {}
    tracker.add(restart)  # emptied once more, the same three songs: 3 again, though 3 was committed before
    tracker.done(restart)
    assert tracker.due() == {("t", 0): 3}
    # A revoked partition is forgotten; a late completion of it changes nothing.
    tracker.add(_msgs("t", 1, [2]))
    tracker.forget([("t", 0)])
    tracker.done(_msgs("t", 1, [2]))
    assert tracker.committable() == {("t", 0): 3}
    assert tracker.in_flight() == 0


def test_a_copy_from_before_a_revocation_never_finishes_the_copy_read_since() -> None:
    """Partition 0 is revoked while offset 10 decodes, then assigned back and 10 read again: whichever
    copy finishes first, the commit stays at 10 until the new copy is done."""
    for old_first in (True, False):
        tracker = CommitTracker()
        (old,) = _msgs("t", 0, [10])
        tracker.add([old])
        tracker.forget([])  # a rebalance took partition 0 away ...
        (new,) = _msgs("t", 0, [10])
        tracker.add([new])  # ... and gave it back: offset 10 is read again from the commit
        tracker.done([old if old_first else new])
        assert tracker.due() == {("t", 0): 10}
        tracker.done([new if old_first else old])
        assert tracker.due() == {("t", 0): 11}
        assert tracker.in_flight() == 0


def test_groups_keep_the_audio_budget_and_score_as_one_batch_would(settings: Settings, tmp_path: Path) -> None:
    """Decodes start only within ``max_batch_audio_bytes``; every message finishes in exactly one
    group; a newer event of a song supersedes the one in flight; the scores equal the plain path's."""
    settings = settings.model_copy(
        update={
            "audio": settings.audio.model_copy(update={"max_duration_s": 3.0}),
            "worker": WorkerSettings(max_batch_audio_bytes=1 << 20, group_songs=3, fetch_threads=4),
        }
    )
    events = [event(f"g-{i}", tone(tmp_path / f"g{i}.wav", freq=200 + 50 * i).as_uri()) for i in range(8)]
    first = [Message("t", 0, i, e.song_id.encode(), e.to_bytes()) for i, e in enumerate(events)]
    again = [Message("t", 0, 8, b"g-0", events[0].to_bytes()), Message("t", 0, 9, None, b"not json")]
    worker = Worker(settings)
    stages = StagedScoring(worker.pipeline)
    finished: list[Message] = []
    scored, dead, peak = [], [], 0
    try:
        stages.admit(first)
        stages.admit(again)
        while stages.busy:
            group = stages.next_group(5.0)
            if group is None:
                continue
            peak = max(peak, stages.held_bytes)  # ready songs and the group, until it is released
            worker.pipeline.finish(group.songs, group.result, lambda what, fn: fn())
            stages.release(group)
            scored += group.result.scored
            dead += group.result.dead
            finished += group.messages
            stages.tracker.done(group.messages)
        plain, _ = worker.pipeline.process(first)
    finally:
        stages.close()
        worker.close()
    assert 0 < peak <= 1 << 20
    assert sorted(m.offset for m in finished) == list(range(10))
    assert stages.tracker.committable() == {("t", 0): 10}
    assert [d.offset for d in dead] == [9]
    assert sorted(s.song_id for s in scored) == sorted(e.song_id for e in events)  # g-0 once
    by_id = {s.song_id: s.model_dump(exclude={"scored_at"}) for s in scored}
    want = {s.song_id: s.model_dump(exclude={"scored_at"}) for s in plain.scored}
    assert by_id.keys() == want.keys()
    for song_id, fields in by_id.items():  # float32 heads differ in the last bit with the batch's size
        floats = {k for k, v in fields.items() if isinstance(v, float)}
        assert {k: v for k, v in fields.items() if k not in floats} == {
            k: v for k, v in want[song_id].items() if k not in floats
        }
        assert [fields[k] for k in floats] == pytest.approx([want[song_id][k] for k in floats], rel=1e-6)


@pytest.fixture
def held_audio(tmp_path: Path) -> Iterator[str]:
    WavHandler.wav = tone(tmp_path / "served.wav").read_bytes()
    WavHandler.release = threading.Event()
    with loopback(WavHandler) as url:
        try:
            yield url
        finally:
            WavHandler.release.set()


def test_sigkill_mid_pipeline_commits_nothing_unwritten(settings: Settings, held_audio: str, tmp_path: Path) -> None:
    """Offset 3's fetch hangs while the songs after it are written: the commit stays at 3, and a
    worker started after a SIGKILL scores offset 3 too. Nothing is lost."""
    settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"topics": settings.kafka.topics.model_copy(update={"partitions": 1})}
            ),
            "audio": AudioSettings(fetch_timeout_s=120.0, allow_private_networks=True),
            "worker": WorkerSettings(
                pipelined=True, max_poll_records=10, pipeline_songs=16, group_songs=2, fetch_threads=3
            ),
        }
    )
    held = 3
    ids = [f"k-{i:02d}" for i in range(10)]
    uris = [f"{held_audio}/{'held' if i == held else 'fast'}/{s}.wav" for i, s in enumerate(ids)]
    publish_events(settings, [event(s, u) for s, u in zip(ids, uris, strict=True)])
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli", "worker"],
            env={**os.environ, **settings_env(settings)},
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        later = set(ids) - {ids[held]}

        def written_around_the_held_song() -> bool:
            if proc.poll() is not None:
                return True  # it died: reported below
            return {s for s, _ in feed(settings)} == later and committed_total(settings) >= held

        wait_for("every song but the held one written and committed", written_around_the_held_song)
        assert proc.poll() is None, log_path.read_text()
    finally:
        proc.kill()  # SIGKILL: the held song is still being fetched
        proc.wait(timeout=30)
    assert ids[held] not in {s for s, _ in feed(settings)}
    assert committed_total(settings) == held, "the commit passed a song still in flight"

    WavHandler.release.set()
    worker = run_worker(settings)
    assert sorted(s for s, _ in feed(settings)) == ids
    assert worker.stats.messages == len(ids) - held  # the restart resumed at the held song
    assert len(index_keys(settings, worker.encoder.vector_dim)) == len(ids)


def _republished(settings: Settings, song_id: str, tmp_path: Path) -> tuple[Message, Message]:
    """A song republished with a working audio URL (offset 7), and a retry of its first event
    (offset 3, a URL since gone) that came due later."""
    topics = settings.kafka.topics
    old = event(song_id, (tmp_path / f"{song_id}-gone.wav").as_uri())
    new = event(song_id, tone(tmp_path / f"{song_id}.wav").as_uri())
    retry_headers = ((ATTEMPTS, b"1"), (NOT_BEFORE_MS, b"0"), (ORIGIN, f"{topics.songs_generated}/0/3".encode()))
    return (
        Message(topics.songs_generated, 0, 7, song_id.encode(), new.to_bytes()),
        Message(topics.songs_retry, 0, 0, song_id.encode(), old.to_bytes(), retry_headers),
    )


def test_a_retry_of_an_older_event_never_supersedes_the_newer_one(settings: Settings, tmp_path: Path) -> None:
    """The retry, due while the newer event is still in flight or in the same poll, finishes
    without a write; the newer event is scored (the old URL would be a file_not_found); both commit."""
    settings = settings.model_copy(update={"worker": WorkerSettings(group_songs=4, fetch_threads=2)})
    topics = settings.kafka.topics
    worker = Worker(settings)
    try:
        for case in ("polls apart", "one poll", "retry first"):
            song_id = case.replace(" ", "-")  # a song of its own: nothing stored to reuse
            g2, retry = _republished(settings, song_id, tmp_path)
            polls = {"polls apart": [[g2], [retry]], "one poll": [[g2, retry]], "retry first": [[retry, g2]]}[case]
            stages = StagedScoring(worker.pipeline)
            scored, dead = [], []
            try:
                for poll in polls:
                    stages.admit(poll)
                while stages.busy:
                    group = stages.next_group(5.0)
                    if group is None:
                        continue
                    worker.pipeline.finish(group.songs, group.result, lambda what, fn: fn())()
                    stages.release(group)
                    scored += group.result.scored
                    dead += group.result.dead
                    stages.tracker.done(group.messages)
            finally:
                stages.close()
            assert ([s.song_id for s in scored], [d.error_code for d in dead]) == ([song_id], []), case
            assert stages.tracker.committable() == {(topics.songs_generated, 0): 8, (topics.songs_retry, 0): 1}
        # The one-batch worker keeps the newer event too, whichever comes first in the poll.
        g2, retry = _republished(settings, "plain", tmp_path)
        for batch in ([g2, retry], [retry, g2]):
            songs, _ = worker.pipeline.parse(batch)
            assert [p.msg for p in songs] == [g2]
    finally:
        worker.close()


class Wrapped(Encoder):
    """The worker's encoder, ``inner``, as it is but for what a subclass's ``encode`` makes of it."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.encoder_id, self.sample_rate = inner.name, inner.encoder_id, inner.sample_rate
        self.n_layers, self.dim = inner.n_layers, inner.dim

    @property
    def vector_dim(self) -> int:
        return self.inner.vector_dim

    def song_vector(self, layers: np.ndarray) -> np.ndarray:
        return self.inner.song_vector(layers)

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.encode(segments)


class OutOfMemory(Wrapped):
    """The worker's encoder, out of device memory for its first ``calls`` encodes (None: always)."""

    def __init__(self, inner: Encoder, calls: int | None) -> None:
        super().__init__(inner)
        self.left = calls

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.left is None or self.left > 0:
            self.left = None if self.left is None else self.left - 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.encode(segments)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pipelined", [False, True])
def test_a_device_out_of_memory_is_retried_not_dead_lettered(
    settings: Settings, store: ScoreStore, tmp_path: Path, pipelined: bool
) -> None:
    """The encoder runs out of device memory on a song's first try (the batch, then the song
    alone): the song goes to the retry topic and is scored on its second try. A song it never
    has the memory for is dead-lettered after worker.fetch_max_attempts tries, saying why."""
    settings = settings.model_copy(
        update={
            "worker": WorkerSettings(
                pipelined=pipelined,
                poll_timeout_ms=200,
                fetch_max_attempts=3,
                fetch_backoff_initial_s=0.3,
                fetch_backoff_max_s=0.6,
            )
        }
    )
    topics = settings.kafka.topics
    for song_id, calls in (("oom-once", 2), ("oom-always", None)):
        publish_events(settings, [event(song_id, tone(tmp_path / f"{song_id}.wav").as_uri())])
        worker = Worker(settings)
        worker.pipeline.encoder = OutOfMemory(worker.encoder, calls)
        worker.run(until_idle_s=2.0, until_caught_up=True)
        st = worker.stats
        if calls is not None:
            assert (st.scored, st.dead_letters, st.retries_scheduled, st.retries_exhausted) == (1, 0, 1, 0)
            assert store.get_song(song_id) is not None
        else:
            assert (st.scored, st.dead_letters, st.retries_scheduled, st.retries_exhausted) == (0, 1, 2, 1)
            assert store.get_song(song_id) is None
    retries = records(settings, topics.songs_retry)
    assert [(r.key, headers(r)[LAST_ERROR]) for r in retries] == [
        (b"oom-once", b"device_out_of_memory"),
        (b"oom-always", b"device_out_of_memory"),
        (b"oom-always", b"device_out_of_memory"),
    ]
    (letter,) = [DeadLetter.model_validate_json(r.value) for r in records(settings, topics.dead_letter)]
    assert (letter.key, letter.source_topic, letter.error_code) == (
        "oom-always",
        topics.songs_generated,
        "device_out_of_memory",
    )
    assert letter.error_code == ErrorCode.DEVICE_OUT_OF_MEMORY
    assert "out of device memory" in letter.message and "gave up after 3 attempts" in letter.message


class DeviceFailed(Wrapped):
    """The worker's encoder after a sticky CUDA error: every encode raises ``error``, as torch does
    until the process ends (an illegal memory access, a device-side assert, an ECC fault)."""

    def __init__(self, inner: Encoder, error: Exception) -> None:
        super().__init__(inner)
        self.error, self.calls = error, 0

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        raise self.error


STICKY = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"


@pytest.mark.parametrize(
    ("error", "fault", "out_of_memory"),
    [
        (torch.AcceleratorError(STICKY), True, False),
        (RuntimeError("CUDA error: device-side assert triggered"), True, False),  # older torch: the message says
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( ... )`"), True, False),
        (torch.AcceleratorError("CUDA error: out of memory"), False, True),  # not sticky: the OOM path
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False, True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, True),
        (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), False, False),  # the input's
        (ValueError("cannot encode an empty segment"), False, False),
    ],
)
def test_device_faults_and_device_memory_are_told_from_bad_input(
    error: Exception, fault: bool, out_of_memory: bool
) -> None:
    assert (is_device_fault(error), is_out_of_memory(error)) == (fault, out_of_memory)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pipelined", [False, True])
def test_a_device_fault_stops_the_worker_with_nothing_committed_or_dead_lettered(
    settings: Settings, store: ScoreStore, tmp_path: Path, pipelined: bool
) -> None:
    """After a sticky CUDA error every encode fails, whatever the song: the worker must not dead-letter
    its whole input and commit it. It stops (the CLI exits non-zero, for the orchestrator to restart it
    with a fresh device context) with nothing committed, and the restarted worker scores each song once."""
    settings = settings.model_copy(update={"worker": WorkerSettings(pipelined=pipelined, poll_timeout_ms=200)})
    topics = settings.kafka.topics
    ids = [f"dev-{i}" for i in range(6)]
    publish_events(
        settings, [event(s, tone(tmp_path / f"{s}.wav", freq=300 + 40 * i).as_uri()) for i, s in enumerate(ids)]
    )
    faults = REGISTRY.get_sample_value("apexrank_worker_retries_total", {"stage": "device fault"}) or 0.0
    worker = Worker(settings)
    failed = worker.pipeline.encoder = DeviceFailed(worker.encoder, torch.AcceleratorError(STICKY))
    with pytest.raises(DeviceFault, match="illegal memory access"):
        worker.run(until_idle_s=2.0, until_caught_up=True)
    assert failed.calls == 1  # no song tried alone: the device, not a song, failed
    assert (worker.stats.scored, worker.stats.dead_letters, worker.stats.retries_scheduled) == (0, 0, 0)
    assert REGISTRY.get_sample_value("apexrank_worker_retries_total", {"stage": "device fault"}) == faults + 1
    assert committed_total(settings) == 0
    assert records(settings, topics.dead_letter) == [] and records(settings, topics.songs_retry) == []
    assert all(store.get_song(s) is None for s in ids)

    stats = run_worker(settings).stats  # the restart: a good device, the same songs read again
    assert (stats.scored, stats.dead_letters) == (6, 0)
    assert sorted(r.key.decode() for r in records(settings, topics.songs_scored)) == ids  # each once
    assert committed_total(settings) == 6
    assert all(store.get_song(s) is not None for s in ids)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pipelined", [False, True])
def test_a_store_read_failing_at_admission_is_retried(
    settings: Settings, store: ScoreStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipelined: bool
) -> None:
    """The embedding store's read of stored embeddings fails once (a locked or busy SQLite file): both
    modes retry it as the infrastructure error it is, where the pipelined worker crashed."""
    settings = settings.model_copy(
        update={"worker": WorkerSettings(pipelined=pipelined, poll_timeout_ms=200, retry_initial_s=0.05)}
    )
    publish_events(settings, [event("locked", tone(tmp_path / "locked.wav").as_uri())])
    worker = Worker(settings)
    emb, reads = worker.index.store, []
    real = emb.get_many

    def get_many(song_ids: Sequence[str]) -> Any:
        if song_ids:  # the pipelined worker admits every poll, empty ones too
            reads.append(list(song_ids))
            if len(reads) == 1:
                raise sqlite3.OperationalError("database is locked")
        return real(song_ids)

    monkeypatch.setattr(emb, "get_many", get_many)
    worker.run(until_idle_s=2.0, until_caught_up=True)
    assert reads == [["locked"], ["locked"]]
    assert (worker.stats.scored, worker.stats.dead_letters) == (1, 0)
    assert store.get_song("locked") is not None and committed_total(settings) == 1
