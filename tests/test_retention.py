"""Retention on the real stack (issue 15, item 4): a song past the window leaves every feed, the API's
table and the FAISS index (the worker's and every reader's), its hash keeps only the engagement
history, its embedding moves to the archive; new songs are untouched, and engagement for an expired
song counts without bringing it back. The Redis parts run on one node and on the real Redis Cluster."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from consumers.feedback import FeedbackConsumer
from consumers.retention import DAY_S, RetentionSweeper
from indexes import EmbeddingArchive, EmbeddingRecord, ScoreStore, SongRecord, SqliteEmbeddingStore, message_marker
from indexes.archive import SongMeta
from indexes.engagement_log import EngagementLog, LoggedEvent, OffsetLog
from indexes.index_reader import IndexReader
from indexes.redis_schema import EXPIRED_AT
from ranker import stores
from ranker.events import Engagement
from ranker.serving.table_sync import TableSync
from ranker.serving.writer import FeedWriter
from ranker.settings import FeedFilters, FeedPolicy, RetentionSettings, Settings
from tests.helpers import engagement
from tests.test_policy import AESTHETIC_MID, iso, with_feeds

DIM = 16
T0 = 1_780_000_000.0  # the simulated clock's start (epoch s)


class SimClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def song(song_id: str, at: float, likes: float = 50.0) -> SongRecord:
    scores = {"streams": 50.0, "likes": likes, **AESTHETIC_MID}
    extra = {"tags": "pop,synth", "duration_s": 120.0, "prior.like_rate": 0.05}
    return SongRecord(song_id, "test-1", scores, 0.5, "suno-v5", iso(at), iso(at), extra=extra)


def embedding(song_id: str, seed: int) -> EmbeddingRecord:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=DIM).astype(np.float32)
    return EmbeddingRecord(
        song_id, "test-enc", rng.normal(size=(3, DIM)).astype(np.float32), v / np.linalg.norm(v), 1, 8
    )


def with_retention(settings: Settings, **retention: object) -> Settings:
    """Two feeds (the second age-limited), a 3-day window."""
    fresh = FeedPolicy(filters=FeedFilters(max_age_hours=24 * 30))
    s = with_feeds(settings, {"cold-start": FeedPolicy(), "fresh": fresh})
    return s.model_copy(update={"retention": RetentionSettings.model_validate({"window_days": 3, **retention})})


@pytest.fixture
def rstore(redis_settings: Settings) -> Iterator[tuple[ScoreStore, Settings]]:
    s = with_retention(redis_settings)
    store = stores.score_store(s)
    yield store, s
    store.close()


def members(store: ScoreStore, feed: str) -> set[str]:
    return {s for s, _ in store.feed_page(feed, 0, 1000)}


def test_expire_songs_keeps_only_the_history_and_leaves_every_feed(rstore: tuple[ScoreStore, Settings]) -> None:
    store, s = rstore  # one node, then Redis Cluster
    counters = stores.engagement_counters(s)
    writer = FeedWriter(s, store)
    try:
        writer.on_scored([song("old.1", T0), song("old.2", T0), song("new.1", T0)], now=T0)
        marks = [message_marker(0, i) for i in range(3)]
        assert (
            counters.count(["old.1", "old.1", "new.1"], ["a", "b", "c"], ["play", "like", "play"], marks, "t") == "nnn"
        )
        assert writer.on_engagement(["old.1", "new.1"], now=T0) == 2
        totals = store.calibration_totals()
        assert members(store, "cold-start") == members(store, "fresh") == {"old.1", "old.2", "new.1"}

        assert store.expire_songs(["old.1", "old.2", "never.1"], list(s.feed.feeds), T0 + 10) == 2
        assert members(store, "cold-start") == members(store, "fresh") == {"new.1"}
        assert store.trim_feed("fresh", T0 + 1e9) == 1  # only new.1 is left in the age index
        kept = store.get_song("old.1")
        assert kept is not None and set(kept) == {
            "song_id",
            "model_version",
            "generator",
            "created_at",
            "scored_at",
            "prior.like_rate",
            "eng.plays",
            "eng.eplays",  # examined plays: history, kept like the plays
            "eng.likes",
            "eng.updated",
            "cal.likes",
            "cal.expected",
            EXPIRED_AT,
        }
        assert float(kept[EXPIRED_AT]) == T0 + 10 and store.get_song("never.1") is None  # no empty hash made
        assert store.expired(["old.1", "old.2", "new.1", "never.1"]) == {"old.1", "old.2"}
        assert store.calibration_totals() == pytest.approx(totals)  # its observed share stays counted
        assert set(store.get_song("new.1") or {}) >= {"score.likes", "tags", "rank_score"}  # untouched

        # Engagement afterwards counts, but brings nothing back into a feed.
        assert counters.count(["old.1"], ["z"], ["play"], [message_marker(1, 9)], "t") == "n"
        assert writer.on_engagement(["old.1"], now=T0 + 20) == 0
        assert "old.1" not in members(store, "cold-start") and store.read_songs(["old.1"])[0].counters["plays"] == 2  # type: ignore[union-attr]
        # Again: idempotent, the first expiry's time kept.
        assert store.expire_songs(["old.1"], list(s.feed.feeds), T0 + 99) == 1
        assert float((store.get_song("old.1") or {})[EXPIRED_AT]) == T0 + 10
        # With a history limit the shrunk hash goes by itself, timed from its first expiry only.
        raw = store.client  # type: ignore[attr-defined]
        assert raw.ttl(store.song_key("old.1")) == -1  # type: ignore[attr-defined]
        writer.on_scored([song("old.3", T0)], now=T0)
        assert store.expire_songs(["old.3"], list(s.feed.feeds), T0 + 10, history_s=3600) == 1
        assert store.expire_songs(["old.3"], list(s.feed.feeds), T0 + 11, history_s=60) == 1
        assert 3500 < raw.ttl(store.song_key("old.3")) <= 3600  # type: ignore[attr-defined]
        assert raw.ttl(store.song_key("new.1")) == -1  # type: ignore[attr-defined]
    finally:
        counters.close()


def test_the_embedding_store_selects_by_age_and_prunes_deletions(tmp_path: Path) -> None:
    clock = SimClock()
    with SqliteEmbeddingStore(tmp_path / "e.sqlite", clock=clock) as emb:
        emb.put_many([embedding("a", 1), embedding("b", 2)])
        clock.now += DAY_S
        emb.put_many([embedding("c", 3)])
        old = emb.older_than(T0 + 1, 10)
        assert [(st.record.song_id, at) for st, at in old] == [("a", T0), ("b", T0)]
        assert [st.record.song_id for st, _ in emb.older_than(T0 + 1, 1)] == ["a"]
        assert emb.older_than(T0, 10) == []
        assert emb.delete(["a", "b"]) == {"a": 4, "b": 5}
        # Only deletions older than the horizon and covered by the caller's index are forgotten.
        assert emb.prune_deletions(T0 + 2 * DAY_S, through_seq=4) == 1 and emb.deletions_pruned_through() == 4
        assert [c.seq for c in emb.iter_changes_since(0)] == [3, 5]
        assert emb.prune_deletions(T0, through_seq=99) == 0 and emb.deletions_pruned_through() == 4
        stats = emb.file_stats()
        assert stats["live_pages"] > 0 and stats["page_size"] > 0 and stats["wal_bytes"] > 0  # WAL mode: pages there


def test_the_archive_is_durable_idempotent_and_readable(tmp_path: Path) -> None:
    clock = SimClock()
    archive = EmbeddingArchive(tmp_path / "archive")
    with SqliteEmbeddingStore(tmp_path / "e.sqlite", clock=clock) as emb:
        emb.put_many([embedding("a", 1), embedding("b", 2)])
        rows = emb.older_than(T0 + 1, 10)
    meta = {"a": SongMeta("suno-v5", iso(T0), "m-1")}
    first = archive.write(rows, T0 + 5, meta)
    again = archive.write(rows, T0 + 6, meta)  # a sweep that crashed before its deletion runs again
    assert first == again and archive.files() == [first] and archive.write([], T0) is None
    assert first is not None and first.parent.name == "day=2026-05-28" and not list(first.parent.glob(".*"))
    got = archive.get_many(["a", "b", "zz"])
    assert set(got) == {"a", "b"} and archive.song_ids() == {"a", "b"}
    np.testing.assert_array_equal(got["a"].record.layers, embedding("a", 1).layers)
    np.testing.assert_array_equal(got["b"].record.vector, embedding("b", 2).vector)
    assert got["a"].key == rows[0][0].key and archive.size_bytes() == first.stat().st_size
    assert archive.metadata(["a", "b"]) == {"a": SongMeta("suno-v5", iso(T0), "m-1"), "b": SongMeta()}
    # Another shard's store with the same sequence numbers, archiving into the same directory: its own file.
    other = EmbeddingArchive(tmp_path / "archive", store_uid=0xABC).write(rows, T0 + 5, meta)
    assert other is not None and other.name.startswith("expired-abc-") and len(archive.files()) == 2


def test_a_write_cut_short_leaves_no_file_for_good(tmp_path: Path) -> None:
    """A crash mid-write leaves the temporary file; the next write (other rows, another name) removes it
    once it is an hour old: a younger one may be another process's write in progress, and another
    store's is that store's to remove."""
    archive = EmbeddingArchive(tmp_path / "archive")
    folder = tmp_path / "archive" / "day=2026-05-27"
    folder.mkdir(parents=True)
    crashed, young = folder / ".expired-0-1-4-4.parquet.tmp", folder / ".expired-0-5-6-2.parquet.tmp"
    other_store = folder / ".expired-abc-1-4-4.parquet.tmp"
    for path in (crashed, young, other_store):
        path.write_bytes(b"half a file")
    for path in (crashed, other_store):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    with SqliteEmbeddingStore(tmp_path / "e.sqlite", clock=SimClock()) as emb:
        emb.put_many([embedding("a", 1)])
        rows = emb.older_than(T0 + 1, 10)
    assert archive.write(rows, T0 + 5) is not None
    assert sorted(p.name for p in folder.iterdir()) == sorted([young.name, other_store.name])


def test_a_sweep_takes_old_songs_off_every_path_and_keeps_new_ones(settings: Settings) -> None:
    s = with_retention(settings, deletions_keep_s=3600)
    clock = SimClock()
    store = stores.score_store(s)
    index = stores.embedding_index(s, DIM)
    index.store.clock = clock
    writer = FeedWriter(s, store)
    old = [f"old.{i}" for i in range(5)]
    new = [f"new.{i}" for i in range(3)]
    feedback = FeedbackConsumer(s)
    try:
        index.add([embedding(x, i) for i, x in enumerate(old)])
        writer.on_scored([song(x, T0) for x in old], now=T0)
        clock.now = T0 + 2 * DAY_S
        index.add([embedding(x, 100 + i) for i, x in enumerate(new)])
        writer.on_scored([song(x, clock.now) for x in new], now=clock.now)
        index.snapshot()
        reader = IndexReader(s.index_dir, "Flat")
        behind = IndexReader(s.index_dir, "Flat")  # loaded now, refreshed only after the pruning
        assert reader.load().vectors == behind.load().vectors == 8

        async def table_after(sweep: object) -> set[str]:
            sync = TableSync(store.async_reads(), list(s.feed.feeds), poll_s=0.05)
            table = await sync.load()
            assert len(table) == 8
            sweep()  # type: ignore[operator]
            while await sync.step():
                pass
            await sync.reads.close()
            assert sync.table is not None
            return {x for x in old + new if x in sync.table}

        sweeper = RetentionSweeper(s, index, store, clock)
        clock.now = T0 + 3.5 * DAY_S
        reports = []
        in_table = asyncio.run(table_after(lambda: reports.append(sweeper.maybe_sweep())))
        report = reports[0]
        assert report is not None and (report.expired, report.shrunk, report.done) == (5, 5, True)
        assert in_table == set(new)  # the API's table dropped them through the change log
        for feed in s.feed.feeds:
            assert members(store, feed) == set(new)
        assert {x for x, _ in index.search(embedding("old.0", 0).vector, 8)} == set(new) and len(index) == 3
        assert reader.refresh() == 5 and reader.status().vectors == 3  # five removals applied
        assert index.store.contains(old + new) == set(new)
        archive = EmbeddingArchive(s.archive_dir)
        assert archive.song_ids() == set(old) and report.archive_bytes == archive.size_bytes() > 0
        assert set(archive.metadata(old).values()) == {SongMeta("suno-v5", iso(T0), "test-1")}
        assert all(set(h or {}).isdisjoint({"score.likes", "rank_score", "tags"}) for h in store.get_songs(old))
        assert store.get_songs(new)[0] is not None and "score.likes" in (store.get_songs(new)[0] or {})
        assert sweeper.maybe_sweep() is None  # not due again before sweep_every_s

        # Engagement for an expired song is counted and logged, and puts it in no feed.
        topic = s.kafka.topics.engagement
        feedback.process([engagement("old.0", "play", 0, topic), engagement("new.0", "like", 1, topic)])
        assert store.read_songs(["old.0"])[0].counters["plays"] == 1  # type: ignore[union-attr]
        assert members(store, s.feed.name) == set(new)

        # A feedback write that raced the sweep (it read the scores just before) put one back: the next
        # sweep takes it out again.
        store.write_feed_entries([], {s.feed.name: {"old.1": 0.9}})
        assert "old.1" in members(store, s.feed.name)

        # Later: the deletion records go once the snapshot covers them and they are older than the horizon;
        # a reader that fell behind them reloads whole and is right.
        index.snapshot()
        clock.now += 2 * 3600
        assert sweeper.sweep(clock.now).deletions_pruned == 5
        assert members(store, s.feed.name) == set(new)
        assert index.store.deletions_pruned_through() > behind.status().watermark
        assert behind.refresh() == 3 and behind.status().vectors == 3 and behind.status().source == "snapshot"
        reader.close()
        behind.close()
    finally:
        feedback.counters.close()
        index.close()
        store.close()


def test_a_backlog_is_swept_in_bounded_steps(settings: Settings) -> None:
    """Retention switched on over a full store: each call does at most its batches and says it is not done."""
    s = with_retention(settings, batch=2)
    clock = SimClock()
    store = stores.score_store(s)
    index = stores.embedding_index(s, DIM)
    index.store.clock = clock
    try:
        index.add([embedding(f"b.{i}", i) for i in range(5)])
        FeedWriter(s, store).on_scored([song(f"b.{i}", T0) for i in range(5)], now=T0)
        clock.now = T0 + 4 * DAY_S
        sweeper = RetentionSweeper(s, index, store, clock)
        steps = [sweeper.sweep(clock.now, max_batches=1) for _ in range(3)]
        assert [(r.expired, r.done) for r in steps] == [(2, False), (2, False), (1, True)]
        assert len(index) == 0 and store.feed_size(s.feed.name) == 0 and len(sweeper.archive.files()) == 3
    finally:
        index.close()
        store.close()


def test_without_a_window_nothing_expires(settings: Settings) -> None:
    store = stores.score_store(settings)
    index = stores.embedding_index(settings, DIM)
    try:
        index.add([embedding("a", 1)])
        sweeper = RetentionSweeper(settings, index, store)
        assert not sweeper.enabled and sweeper.maybe_sweep() is None and len(index) == 1
        with pytest.raises(ValueError, match="window_days"):
            sweeper.sweep(T0 + 1e9)
    finally:
        index.close()
        store.close()


def test_the_engagement_log_drops_old_days_but_keeps_each_partitions_last_file(tmp_path: Path) -> None:
    log = EngagementLog(tmp_path / "eng", "engagement")

    def event(day: int, partition: int, offset: int) -> LoggedEvent:
        ts = datetime(2026, 5, day, 12, tzinfo=UTC)
        return LoggedEvent(f"e{offset}", "s", "u", "play", ts, None, None, partition, offset)

    log.append([event(1, 0, 0), event(1, 0, 1)])
    log.append([event(1, 1, 0)])  # partition 1's last file: kept whatever its age
    log.append([event(5, 0, 2)])
    log.append([event(9, 0, 3)])
    assert log.maybe_prune(None) == 0  # no retention configured
    assert log.maybe_prune(3, now=datetime(2026, 5, 9, tzinfo=UTC)) == 2  # day 1 p0 and day 5
    log.append([event(10, 0, 4)])
    assert log.maybe_prune(1, now=datetime(2026, 5, 20, tzinfo=UTC)) == 0  # not due again within the hour
    days = sorted(p.parent.name for p in (tmp_path / "eng").glob("day=*/*.parquet"))
    assert days == ["day=2026-05-01", "day=2026-05-09", "day=2026-05-10"]
    fresh = EngagementLog(tmp_path / "eng", "engagement")
    assert fresh.logged_through(0) == 4 and fresh.logged_through(1) == 0  # a replay is still skipped
    assert sorted(fresh.read().column("offset").to_pylist()) == [0, 3, 4]


def _forty_days_of_log(directory: Path) -> tuple[EngagementLog, datetime]:
    """A log of 40 days, one file per day and partition (two partitions), as one member wrote it."""
    log = EngagementLog(directory, "engagement")
    start = datetime(2026, 5, 1, 12, tzinfo=UTC)
    for day in range(40):
        for partition in (0, 1):
            ts = start + timedelta(days=day)
            log.append([LoggedEvent(f"p{partition}-d{day}", "s", "u", "play", ts, None, None, partition, day)])
    return log, start + timedelta(days=39)


def test_a_read_skips_the_files_a_members_prune_deletes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """retrain reads the whole log while a feedback member prunes it (hourly): a file listed but gone
    before it is opened is not read, and a second listing finds nothing more (pruned: gone for good).
    Forced: the member prunes right after the first listing."""
    member, last = _forty_days_of_log(tmp_path)
    reader = EngagementLog(tmp_path, "engagement")
    listed: list[int] = []

    def list_then_prune(pattern: str = "*.parquet") -> list[Path]:
        files = OffsetLog._files(reader, pattern)
        listed.append(len(files))
        if len(listed) == 1:
            assert member.prune(last - timedelta(days=9)) == 60  # 30 days of two partitions, after the listing
        return files

    monkeypatch.setattr(reader, "_files", list_then_prune)
    ids = reader.read().column("event_id").to_pylist()
    assert listed == [80, 20]
    assert sorted(ids) == sorted(f"p{p}-d{d}" for p in (0, 1) for d in range(30, 40))


def test_a_read_finds_the_files_a_members_topic_restart_sets_aside_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member that sees the topic made again renames the live files to an earlier generation while
    retrain reads: the same rows under new names, which the read lists again and keeps (skipping
    them as if pruned trained on a partial log)."""
    member, _ = _forty_days_of_log(tmp_path)
    member.follow_topic("id-1")
    reader = EngagementLog(tmp_path, "engagement")
    every = sorted(reader.read().column("event_id").to_pylist())
    assert len(every) == 80
    listed: list[int] = []

    def list_then_restart(pattern: str = "*.parquet") -> list[Path]:
        files = OffsetLog._files(reader, pattern)
        listed.append(len(files))
        if len(listed) == 1:
            assert EngagementLog(tmp_path, "engagement").follow_topic("id-2") == 80
        return files

    monkeypatch.setattr(reader, "_files", list_then_restart)
    assert sorted(reader.read().column("event_id").to_pylist()) == every
    assert listed == [80, 80]


def test_two_members_pruning_one_directory_both_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every member of the feedback group prunes the shared directory. One lists the files, the other
    then prunes them all and the emptied day folders; the first's deletes find files and folders gone
    (and a kept file's folder not empty): no error, each file counted once."""
    second, last = _forty_days_of_log(tmp_path)
    first = EngagementLog(tmp_path, "engagement")
    cutoff = last - timedelta(days=9)
    raced: list[int] = []

    def list_then_race(pattern: str = "*.parquet") -> list[Path]:
        files = OffsetLog._files(first, pattern)
        if pattern == "*.parquet" and not raced:
            raced.append(second.prune(cutoff))
        return files

    monkeypatch.setattr(first, "_files", list_then_race)
    assert first.prune(cutoff) == 0 and raced == [60]  # the other member deleted them all first
    days = sorted(p.name for p in tmp_path.glob("day=*"))
    assert days == [f"day={(last - timedelta(days=d)).date().isoformat()}" for d in range(9, -1, -1)]
    ids = EngagementLog(tmp_path, "engagement").read().column("event_id").to_pylist()
    assert len(ids) == 20 and first.logged_through(0) == second.logged_through(1) == 39


def test_retraining_finds_expired_songs_in_the_archive(settings: Settings) -> None:
    """An expired song's embedding left the store for the archive, and its hash may be gone too:
    retraining still learns from it, with its archived layers and cohort."""
    from consumers.retrain import gather

    s = with_retention(settings)
    clock = SimClock()
    store = stores.score_store(s)
    index = stores.embedding_index(s, DIM)
    index.store.clock = clock
    ids = ["old.0", "old.1", "new.0"]
    records = {x: embedding(x, i) for i, x in enumerate(ids)}
    try:
        index.add([records["old.0"], records["old.1"]])
        FeedWriter(s, store).on_scored([song("old.0", T0), song("old.1", T0)], now=T0)
        clock.now = T0 + 3.5 * DAY_S
        index.add([records["new.0"]])
        FeedWriter(s, store).on_scored([song("new.0", clock.now)], now=clock.now)
        report = RetentionSweeper(s, index, store, clock).sweep(clock.now)
        assert report.expired == 2 and index.store.contains(ids) == {"new.0"}
        store.client.delete(store.keys.song("old.1"))  # type: ignore[attr-defined]  # past history_days
        log = EngagementLog(s.engagement_log_dir, s.kafka.topics.engagement)
        played = datetime.fromtimestamp(clock.now, UTC)
        log.append([LoggedEvent(f"e{i}", x, "u", "play", played, None, None, 0, i) for i, x in enumerate(ids + ids)])
        observed, features = gather(s, store)
        assert observed.song_ids == sorted(ids) == features.song_ids
        assert observed.generators == ["suno-v5"] * 3
        for x, layers in zip(features.song_ids, features.layers, strict=True):
            np.testing.assert_array_equal(layers, records[x].layers, err_msg=x)
    finally:
        index.close()
        store.close()


def test_the_feedback_consumer_prunes_old_engagement_log_days(settings: Settings) -> None:
    """With retention.engagement_log_days, the consumer drops old day files after a commit (never a
    partition's newest file, which records how far that partition is logged)."""
    from tests.test_feedback import publish

    s = with_retention(settings, engagement_log_days=1)
    topic = s.kafka.topics.engagement
    log = EngagementLog(s.engagement_log_dir, topic)
    old = datetime.fromtimestamp(T0, UTC)  # years before the test's now
    log.append([LoggedEvent(f"o{i}", "x", "u", "play", old, None, None, 7, i) for i in range(2)])
    log.append([LoggedEvent("o2", "x", "u", "play", old, None, None, 7, 2)])
    assert len(list(s.engagement_log_dir.rglob("*.parquet"))) == 2
    event = Engagement(event_id="now-1", song_id="y", user_id="u", type="play", ts=datetime.now(UTC))
    publish(s, [event.to_bytes()], [b"y"])
    consumer = FeedbackConsumer(s)
    try:
        assert consumer.run(until_idle_s=1.0, until_caught_up=True).accepted == 1
    finally:
        consumer.counters.close()
    left = EngagementLog(s.engagement_log_dir, topic).read().to_pydict()
    assert sorted(left["event_id"]) == ["now-1", "o2"]  # the old day's older file went, its newest stayed


def test_the_worker_sweeps_its_own_shard(settings: Settings, tmp_path: Path) -> None:
    """The worker's loop calls the sweeper: a song scored longer ago than the window (here seconds)
    leaves the feeds, the store and the index while the worker runs."""
    import threading
    import time

    from consumers.publish import publish_events
    from consumers.retrain import STORE_FILE
    from consumers.worker import Worker
    from tests.helpers import event, tone

    s = with_retention(settings, window_days=2.0 / DAY_S, sweep_every_s=0.2)
    store = stores.score_store(s)
    publish_events(s, [event("ret-1", tone(tmp_path / "a.wav", seconds=1.5).as_uri())])
    worker = Worker(s)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline:
            present = "ret-1" in members(store, s.feed.name)
            seen = seen or present
            if seen and not present and not worker.index.contains("ret-1"):
                break
            time.sleep(0.1)
        assert seen and "ret-1" not in members(store, s.feed.name), "the song was never scored, or never swept"
        assert not worker.index.contains("ret-1")
        with SqliteEmbeddingStore(s.index_dir / STORE_FILE) as emb:
            assert emb.contains(["ret-1"]) == set()
        assert EmbeddingArchive(s.archive_dir).song_ids() == {"ret-1"}
        assert store.expired(["ret-1"]) == {"ret-1"}
    finally:
        worker.request_stop()
        thread.join(60)
        store.close()
