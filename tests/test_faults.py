"""Faults survived on the real stack: Redis and broker restarts, corrupt snapshots, a full disk, two workers.

Each test ends by checking that nothing was lost or doubled: every song once in
the feed, once in the index, once in the embedding store.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

from consumers.kafka_io import all_topics
from consumers.publish import publish_events
from consumers.stack import EmbeddedStack, port_open, redis_serving
from consumers.worker import Worker
from indexes.base import faiss_id
from indexes.index_reader import open_index_reader
from ranker.settings import IndexSettings, Settings, WorkerSettings
from tests.helpers import event, tone, wait_for
from tests.test_worker import feed, index_keys


def fast_retry(settings: Settings, **index: object) -> Settings:
    return settings.model_copy(
        update={
            "worker": WorkerSettings(max_poll_records=4, retry_initial_s=0.2, retry_max_s=1.0),
            "index": settings.index.model_copy(update=index),
        }
    )


@contextmanager
def running_worker(settings: Settings) -> Iterator[Worker]:
    """A worker consuming in a background thread until the block ends."""
    worker = Worker(settings)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the worker did not stop"
        assert not errors, errors


def committed_total(settings: Settings) -> int:
    """Sum of the worker group's committed offsets over the topic's partitions."""
    consumer = KafkaConsumer(group_id=settings.kafka.worker_group_id, **settings.kafka.client_kwargs())
    try:
        topic = settings.kafka.topics.songs_generated
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        consumer.close()


def songs(tmp_path: Path, prefix: str, n: int) -> list:  # type: ignore[type-arg]
    return [
        event(f"{prefix}-{i}", tone(tmp_path / f"{prefix}{i}.wav", freq=200 + 13 * i, seed=i).as_uri())
        for i in range(n)
    ]


def assert_exactly_once(settings: Settings, worker: Worker, ids: list[str]) -> None:
    assert sorted(s for s, _ in feed(settings)) == sorted(ids)
    assert sorted(index_keys(settings, worker.encoder.vector_dim)) == sorted(faiss_id(i) for i in ids)


def test_the_stack_waits_for_redis_to_answer_not_for_its_port() -> None:
    """After a restart Redis opens its port, then answers every command with LOADING while it reads its
    dataset back: a test (or a demo) that went on at the open port met BusyLoadingError. ``up`` waits for
    PONG; a server that answers LOADING is not serving yet."""
    answers = [b"-LOADING Redis is loading the dataset in memory\r\n", b"+PONG\r\n"]
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while answers:
            conn, _ = server.accept()
            with conn:
                if conn.recv(64):  # port_open's connection sends nothing
                    conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    try:
        assert port_open("127.0.0.1", port)
        assert not redis_serving("127.0.0.1", port)  # the port is open, the data not loaded
        assert redis_serving("127.0.0.1", port)
    finally:
        thread.join(5)
        server.close()


def test_redis_outage_nothing_committed_unwritten(stack: EmbeddedStack, settings: Settings, tmp_path: Path) -> None:
    settings = fast_retry(settings)
    first, second = songs(tmp_path, "r1", 8), songs(tmp_path, "r2", 8)
    with running_worker(settings) as worker:
        publish_events(settings, first)
        wait_for("first songs", lambda: len(feed(settings)) == 8)
        wait_for("first commit", lambda: committed_total(settings) == 8)
        stack.stop_one("redis")
        try:
            publish_events(settings, second)
            time.sleep(3.0)  # the worker is retrying against a dead Redis
            assert committed_total(settings) == 8, "offsets were committed for writes that never landed"
        finally:
            stack.up()
        wait_for("second songs", lambda: len(feed(settings)) == 16)
        wait_for("second commit", lambda: committed_total(settings) == 16)
    assert_exactly_once(settings, worker, [e.song_id for e in first + second])


def partition_counts(settings: Settings) -> dict[str, int]:
    """Topic -> partitions, for every topic on the broker."""
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()


def topics_as_configured(settings: Settings) -> bool:
    """Every topic the worker uses exists, each with the configured partition count."""
    counts = partition_counts(settings)
    return all(counts.get(t) == settings.kafka.topics.partitions for t in all_topics(settings.kafka))


def test_broker_restart_reconnects_and_keeps_what_was_committed(
    stack: EmbeddedStack, settings: Settings, tmp_path: Path
) -> None:
    """The broker comes back empty under a running worker.

    The worker read each partition past offset 0 before the restart. It sees its topics gone,
    recreates them with the configured partition count (not the broker's default), and the new
    songs land at offset 0 of partitions it kept through the rejoin: it must read them from
    there, not from its old fetch positions. Publishing only once the worker has recreated its
    topics makes this the path taken every time (a publisher recreating songs.generated first
    can let kafka-python drop the partitions, a path that never had the bug).
    """
    settings = fast_retry(settings)
    first, second = songs(tmp_path, "b1", 5), songs(tmp_path, "b2", 5)
    with running_worker(settings) as worker:
        publish_events(settings, first)
        wait_for("first songs", lambda: len(feed(settings)) == 5)
        wait_for("their commit", lambda: committed_total(settings) == 5)
        stack.stop_one("kafka")
        time.sleep(1.0)
        stack.up()  # the embedded broker is memory-only: it comes back empty
        assert committed_total(settings) == 0, "the broker was not emptied"
        wait_for("the worker to recreate its topics", lambda: topics_as_configured(settings), timeout_s=60)
        publish_events(settings, second)
        wait_for("songs after the restart", lambda: len(feed(settings)) == 10, timeout_s=120)
        wait_for("their commit on the new broker", lambda: committed_total(settings) == 5, timeout_s=30)
    assert_exactly_once(settings, worker, [e.song_id for e in first + second])
    assert topics_as_configured(settings)


def test_corrupt_and_missing_snapshots_are_rebuilt_from_the_store(settings: Settings, tmp_path: Path) -> None:
    batch1, batch2, batch3 = songs(tmp_path, "c1", 4), songs(tmp_path, "c2", 3), songs(tmp_path, "c3", 2)
    publish_events(settings, batch1)
    Worker(settings).run(until_idle_s=2.0, until_caught_up=True)
    (settings.index_dir / "index.faiss").write_bytes(b"\x00garbage" * 100)
    publish_events(settings, batch2)
    Worker(settings).run(until_idle_s=2.0, until_caught_up=True)
    (settings.index_dir / "index.meta.json").unlink()
    publish_events(settings, batch3)
    worker = Worker(settings)
    assert worker.index.open_report is not None and "rebuil" in str(worker.index.open_report).lower()
    worker.run(until_idle_s=2.0, until_caught_up=True)
    assert_exactly_once(settings, worker, [e.song_id for e in batch1 + batch2 + batch3])


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real filesystem that runs out of space."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_for_snapshots_never_leaves_a_corrupt_snapshot(
    settings: Settings, tmp_path: Path, tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index_dir = tiny_disk / "index"
    settings = fast_retry(settings, path=index_dir, snapshot_every_songs=1)
    first, second = songs(tmp_path, "f1", 4), songs(tmp_path, "f2", 4)
    caplog.set_level(logging.WARNING)
    with running_worker(settings) as worker:
        publish_events(settings, first)
        wait_for("first songs", lambda: len(feed(settings)) == 4)
        meta_before = json.loads((index_dir / "index.meta.json").read_text())
        filler = tiny_disk / "filler"
        with open(filler, "wb") as fh:  # fill the disk to the last byte
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        publish_events(settings, second)
        wait_for("a disk-full failure", lambda: "No space left" in caplog.text or "disk is full" in caplog.text)
        meta_now = json.loads((index_dir / "index.meta.json").read_text())
        assert meta_now["sha256"] in (meta_before["sha256"], _sha256(index_dir / "index.faiss"))
        assert meta_now["sha256"] == _sha256(index_dir / "index.faiss"), "snapshot pair torn or corrupt"
        filler.unlink()
        wait_for("second songs", lambda: len(feed(settings)) == 8)
    assert_exactly_once(settings, worker, [e.song_id for e in first + second])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_workers_in_one_group_share_partitions(settings: Settings, tmp_path: Path) -> None:
    batch = songs(tmp_path, "two", 24)
    shard = [settings.model_copy(update={"index": IndexSettings(path=tmp_path / f"shard-{i}")}) for i in range(2)]
    with running_worker(shard[0]) as w0, running_worker(shard[1]) as w1:
        wait_for("both members to own partitions", lambda: bool(w0.assignment) and bool(w1.assignment))
        assert not w0.assignment & w1.assignment
        publish_events(settings, batch)
        wait_for("every song", lambda: len(feed(settings)) == len(batch))
    assert w0.stats.messages > 0 and w1.stats.messages > 0, (w0.stats, w1.stats)
    assert sorted(s for s, _ in feed(settings)) == sorted(e.song_id for e in batch)
    keys: list[int] = []
    for s, w in zip(shard, (w0, w1), strict=True):
        keys += index_keys(s, w.encoder.vector_dim)
    assert sorted(keys) == sorted(faiss_id(e.song_id) for e in batch), "each song in exactly one shard"

    # Similar-song search fans out over both shards (settings.index.shards, glob allowed) and merges.
    api_settings = settings.model_copy(
        update={"index": IndexSettings(path=tmp_path / "shard-0", shards=[str(tmp_path / "shard-*")])}
    )
    assert api_settings.index_shards == [tmp_path / "shard-0", tmp_path / "shard-1"]
    reader = open_index_reader(api_settings.index_shards, "Flat")
    try:
        assert reader.load().vectors == len(batch)
        hits = reader.similar(batch[0].song_id, k=len(batch))
    finally:
        reader.close()
    assert sorted(s for s, _ in hits) == sorted(e.song_id for e in batch[1:])
    assert [sim for _, sim in hits] == sorted((sim for _, sim in hits), reverse=True)
