"""The pipelined worker (consumers.worker_stages): commits stay behind every unwritten song when
groups finish out of poll order, in the tracker alone and across a SIGKILL on the real stack."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.loop import Message
from consumers.publish import publish_events
from consumers.worker import Worker
from consumers.worker_stages import CommitTracker, StagedScoring
from ranker.settings import AudioSettings, Settings, WorkerSettings
from tests.helpers import WavHandler, event, loopback, settings_env, tone, wait_for
from tests.test_faults import committed_total
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
