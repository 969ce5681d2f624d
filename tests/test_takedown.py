"""Takedown on the real stack (issue 15, item 3): a song taken down leaves every store, and a replay of
its events does not bring it back. The Redis parts run on one node and on the real Redis Cluster."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import make_consumer
from consumers.retrain import STORE_FILE, gather
from consumers.stack import free_port
from consumers.takedown import apply_deleted, check_ids, read_ids, run, take_down
from indexes import (
    TOMBSTONED,
    EmbeddingRecord,
    RemovedEmbedding,
    ScoreStore,
    SqliteEmbeddingStore,
    StoredEmbedding,
    message_marker,
    open_score_store,
)
from indexes.engagement_log import EngagementLog, LoggedEvent
from ranker import stores
from ranker.events import SongDeleted
from ranker.serving.api import create_app
from ranker.serving.writer import FeedWriter
from ranker.settings import Settings
from tests.helpers import engagement
from tests.test_policy import NOW, record

ADMIN, READ = "admin-token-1", "read-token-1"
DIM = 8


def with_takedown(settings: Settings) -> Settings:
    """The test's settings with its own songs.deleted topic, an admin token and a read token."""
    topics = settings.kafka.topics.model_copy(update={"songs_deleted": f"{settings.kafka.topics.engagement}.deleted"})
    kafka = settings.kafka.model_copy(update={"topics": topics})
    api = settings.api.model_copy(update={"admin_tokens": [SecretStr(ADMIN)], "tokens": [SecretStr(READ)]})
    return settings.model_copy(update={"kafka": kafka, "api": api})


def embedding(song_id: str, seed: int) -> EmbeddingRecord:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    layers = np.random.default_rng(seed + 1).normal(size=(2, DIM)).astype(np.float32)
    return EmbeddingRecord(song_id, "test-enc", layers, v / np.linalg.norm(v), 1, 1)


@pytest.fixture
def redis_store_and_settings(redis_settings: Settings) -> Iterator[tuple[ScoreStore, Settings]]:
    s = stores.score_store(redis_settings)
    yield s, redis_settings
    s.close()


def test_delete_songs_removes_the_song_everywhere_in_redis_and_replays_stay_no_ops(
    redis_store_and_settings: tuple[ScoreStore, Settings],
) -> None:
    store, settings = redis_store_and_settings  # one node, then Redis Cluster
    feed = settings.feed.name
    counters = stores.engagement_counters(settings)
    try:
        gone, kept = record("gone.1"), record("kept.1")
        store.write_songs([gone, kept], feed)
        store.write_feed_entries([], {"second": {"gone.1": 0.5}}, ages={"second": {"gone.1": NOW}})
        ids, events, kinds = ["gone.1", "gone.1", "kept.1"], ["a", "b", "c"], ["play", "like", "play"]
        assert counters.count(ids, events, kinds, [message_marker(0, i) for i in range(3)], "t") == "nnn"
        store.claim_calibration({"gone.1": 0.25, "kept.1": 0.25})
        assert store.calibration_totals() == pytest.approx((1.0, 0.5))

        out = store.delete_songs(["gone.1", "never.1"], "rights claim", [feed, "second", "unused"])
        assert [(d.song_id, d.had_record, d.already_deleted, set(d.feeds)) for d in out] == [
            ("gone.1", True, False, {feed, "second"}),
            ("never.1", False, False, set()),
        ]
        assert store.get_song("gone.1") is None and store.get_song("kept.1") is not None
        assert [s for s, _ in store.feed_page(feed, 0, 10)] == ["kept.1"]
        assert store.feed_size("second") == 0 and store.trim_feed("second", NOW + 1) == 0  # age index empty too
        assert store.calibration_totals() == pytest.approx((0.0, 0.25))  # only kept.1's share is left
        assert store.deleted(["gone.1", "kept.1", "never.1"]) == {"gone.1", "never.1"}
        assert counters.counts(["gone.1"])["gone.1"] == dict.fromkeys(
            ("plays", "likes", "skips", "completes", "shares"), 0
        )

        # A replayed songs.generated reaching the store, a feed update, an engagement event: all no-ops.
        store.write_songs([gone, record("never.1")], feed)
        store.write_feed_entries([gone], {"second": {"gone.1": 0.9, "kept.1": 0.4}})
        assert store.get_song("gone.1") is None and store.get_song("never.1") is None
        assert [s for s, _ in store.feed_page(feed, 0, 10)] == ["kept.1"]
        assert [s for s, _ in store.feed_page("second", 0, 10)] == ["kept.1"]
        markers = [message_marker(1, 7), message_marker(1, 8)]
        assert counters.count(["gone.1", "kept.1"], ["z", "y"], ["play", "play"], markers, "t") == TOMBSTONED + "n"
        assert store.get_song("gone.1") is None and store.read_songs(["kept.1"])[0].counters["plays"] == 2  # type: ignore[union-attr]
        store.claim_calibration({"gone.1": 0.25})
        assert store.get_song("gone.1") is None

        # Taken down again: idempotent.
        again = store.delete_songs(["gone.1"], "again", [feed])
        assert again[0].already_deleted and not again[0].had_record and again[0].feeds == ()
    finally:
        counters.close()


def test_tombstones_live_forever_by_default_or_for_the_retention(settings: Settings) -> None:
    url, prefix = settings.redis.url.get_secret_value(), settings.redis.key_prefix
    forever = open_score_store(url, key_prefix=prefix)
    bounded = open_score_store(url, key_prefix=prefix + "b", tombstone_retention_s=3600)
    try:
        forever.delete_songs(["x.1"], "abuse", [])
        bounded.delete_songs(["x.1"], "abuse", [])
        raw = forever.client  # type: ignore[attr-defined]
        assert raw.ttl(f"{prefix}:gone:{{x.1}}") == -1
        assert 3500 < raw.ttl(f"{prefix}b:gone:{{x.1}}") <= 3600
        assert '"reason":"abuse"' in raw.get(f"{prefix}:gone:{{x.1}}")
    finally:
        forever.close()
        bounded.close()


def test_the_embedding_store_records_deletions_in_sequence_with_upserts(tmp_path: Path) -> None:
    with SqliteEmbeddingStore(f"{tmp_path}/e.sqlite") as emb:
        emb.put_many([embedding("a", 1), embedding("b", 2)])
        assert emb.delete(["a", "absent"]) == {"a": 3}
        assert emb.delete(["a"]) == {} and emb.max_seq() == 3
        assert emb.get("a") is None and emb.contains(["a", "b"]) == {"b"} and emb.count() == 1
        emb.put_many([embedding("a", 3)])  # stored again after its deletion: a later number

        def seen(seq: int, batch: int = 4096) -> list[tuple[str, int, str]]:
            out = []
            for c in emb.iter_changes_since(seq, batch):
                kind = "del" if isinstance(c, RemovedEmbedding) else "put"
                song = c.song_id if isinstance(c, RemovedEmbedding) else c.record.song_id
                assert isinstance(c, RemovedEmbedding | StoredEmbedding)
                out.append((kind, c.seq, song))
            return out

        assert seen(0) == [("put", 2, "b"), ("del", 3, "a"), ("put", 4, "a")]
        assert seen(0, batch=1) == seen(0) and seen(2) == [("del", 3, "a"), ("put", 4, "a")] and seen(4) == []
        assert [s.record.song_id for s in emb.iter_since(0)] == ["b", "a"]  # existing callers: upserts only
        removed = next(c for c in emb.iter_changes_since(2) if isinstance(c, RemovedEmbedding))
        assert removed.key == emb.get("a").key  # type: ignore[union-attr]  # the same faiss id


def test_the_command_takes_a_file_of_ids_and_refuses_bad_input(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = with_takedown(settings)
    store = stores.score_store(s)
    store.write_songs([record("A"), record("B")], s.feed.name)
    ids = tmp_path / "ids.txt"
    ids.write_text("A\n")
    try:
        bad = argparse.Namespace(song_ids=["B", "no way"], file=str(ids), reason="abuse", json=False)
        assert run(s, bad) == 2 and "invalid song id 'no way'" in capsys.readouterr().err
        assert store.deleted(["A", "B"]) == set()  # nothing was deleted
        good = argparse.Namespace(song_ids=["B"], file=str(ids), reason="abuse", json=True)
        assert run(s, good) == 0
        assert json.loads(capsys.readouterr().out)["removed"] == 2
        assert store.deleted(["A", "B"]) == {"A", "B"}
        none = argparse.Namespace(song_ids=[], file=None, reason="abuse", json=False)
        assert run(s, none) == 2 and "name songs to delete" in capsys.readouterr().err
    finally:
        store.close()


def test_apexrank_songs_delete_on_the_command_line(settings: Settings, tmp_path: Path) -> None:
    """The installed command, wired in the CLI: ids and a file, a JSON report, the songs down."""
    import os
    import subprocess
    import sys

    from tests.helpers import settings_env

    s = with_takedown(settings)
    store = stores.score_store(s)
    store.write_songs([record("C"), record("D")], s.feed.name)
    ids = tmp_path / "ids.txt"
    ids.write_text("# claim 7\nD\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    env.update(settings_env(s))
    cli = "import sys; from consumers.cli import main; sys.argv[0] = 'apexrank'; sys.exit(main())"
    argv = [sys.executable, "-c", cli, "songs", "delete", "C", "--file", str(ids), "--reason", "abuse", "--json"]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["removed"] == 2
        assert store.deleted(["C", "D"]) == {"C", "D"} and store.get_songs(["C", "D"]) == [None, None]
    finally:
        store.close()


def test_ids_are_checked_before_anything_is_deleted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid song id 'a b'"):
        check_ids(["ok.1", "a b"])
    path = f"{tmp_path}/ids.txt"
    with open(path, "w") as fh:
        fh.write("# takedown list\nx.1\n\n  y.2  # claim 42\nx.1\n")
    assert check_ids(read_ids(Path(path))) == ["x.1", "y.2"]


def _wait(check: object, timeout_s: float = 10.0) -> bool:
    """Poll ``check()`` until true or the deadline (a wait for asynchronous work, not a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_delete_through_the_api_and_the_cli_takes_the_song_down_everywhere(redis_settings: Settings) -> None:
    s = with_takedown(redis_settings)  # one node, then Redis Cluster
    feed = s.feed.name
    store = stores.score_store(s)
    FeedWriter(s, store).on_scored([record("A", likes=90), record("B", likes=60), record("C", likes=30)], now=NOW)
    emb = SqliteEmbeddingStore(s.index_dir / STORE_FILE)
    emb.put_many([embedding("A", 1), embedding("B", 2), embedding("C", 3)])
    topic = s.kafka.topics.engagement
    feedback = FeedbackConsumer(s)
    metrics_before = 0.0
    try:
        feedback.process([engagement("A", "play", 0, topic), engagement("A", "like", 1, topic)])
        read, admin = {"Authorization": f"Bearer {READ}"}, {"Authorization": f"Bearer {ADMIN}"}
        with TestClient(create_app(s)) as client:
            page = client.get(f"/v1/feeds/{feed}", headers=read).json()
            assert {i["song_id"] for i in page["items"]} == {"A", "B", "C"}
            assert client.delete("/v1/songs/A").status_code == 401
            denied = client.delete("/v1/songs/A", headers=read)
            assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
            assert store.get_song("A") is not None  # nothing was deleted by those

            r = client.delete("/v1/songs/A", headers=admin, params={"reason": "rights claim"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["had_record"] and not body["already_deleted"] and feed in body["feeds"]
            # This process's table dropped it at once: pages, rerank, the song itself.
            page = client.get(f"/v1/feeds/{feed}", headers=read).json()
            assert {i["song_id"] for i in page["items"]} == {"B", "C"}
            ranked = client.post("/v1/rank", json={"candidates": ["A", "B"]}, headers=read).json()
            assert ranked["unknown"] == ["A"] and [i["song_id"] for i in ranked["items"]] == ["B"]
            assert client.get("/v1/songs/A", headers=read).status_code == 404
            again = client.delete("/v1/songs/A", headers=admin)
            assert again.status_code == 200 and again.json()["already_deleted"]

            # The CLI path, while the API runs: its table drops B through the change log.
            report = take_down(s, ["B"], "abuse")
            assert (report.requested, report.removed, report.feeds, report.published) == (1, 1, {feed: 1}, 1)

            def b_gone() -> bool:
                got = client.post("/v1/rank", json={"candidates": ["B", "C"]}, headers=read).json()
                return bool(got["unknown"] == ["B"])

            assert _wait(b_gone)
            page = client.get(f"/v1/feeds/{feed}", headers=read).json()
            assert [i["song_id"] for i in page["items"]] == ["C"]

            # Engagement for it afterwards is a no-op, counted on /metrics.
            metrics_before = _tombstoned_metric(client.get("/metrics").text)
            feedback.process([engagement("A", "play", 2, topic), engagement("C", "play", 3, topic)])
            assert feedback.stats.tombstoned == 1 and store.get_song("A") is None
            assert _tombstoned_metric(client.get("/metrics").text) == metrics_before + 1

        # songs.deleted was published for A (twice: the DELETE is idempotent and says so again) and B.
        events = _read_deleted(s, 3)
        assert sorted((e.song_id, e.reason) for e in events) == [
            ("A", "rights claim"),
            ("A", "takedown"),
            ("B", "abuse"),
        ]
        # The worker's handler removes the embeddings; the index catches up from these deletions.
        assert apply_deleted(emb, events) == 2
        assert emb.contains(["A", "B", "C"]) == {"C"}
        assert [type(c).__name__ for c in emb.iter_changes_since(3)] == ["RemovedEmbedding", "RemovedEmbedding"]
        # A replayed songs.generated reaching the store does not bring it back.
        store.write_songs([record("A", likes=99)], feed)
        assert store.get_song("A") is None and [x for x, _ in store.feed_page(feed, 0, 10)] == ["C"]
    finally:
        feedback.counters.close()
        emb.close()
        store.close()


def test_a_takedown_whose_event_cannot_be_published_says_so_and_can_be_retried(settings: Settings) -> None:
    s = with_takedown(settings)
    dead = s.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_ms": 2000})
    store = stores.score_store(s)
    store.write_songs([record("A")], s.feed.name)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        with TestClient(create_app(s.model_copy(update={"kafka": dead}))) as client:
            r = client.delete("/v1/songs/A", headers=admin)
            assert r.status_code == 503 and r.json()["error"] == "event_not_published"
        assert store.get_song("A") is None and store.deleted(["A"]) == {"A"}  # the store part stands
        with TestClient(create_app(s)) as client:  # Kafka back: the retry publishes
            r = client.delete("/v1/songs/A", headers=admin)
            assert r.status_code == 200 and r.json()["already_deleted"]
        assert [e.song_id for e in _read_deleted(s, 1)] == ["A"]
    finally:
        store.close()


def test_takedown_needs_an_admin_token_configured(settings: Settings) -> None:
    s = settings.model_copy(update={"api": settings.api.model_copy(update={"tokens": [SecretStr(READ)]})})
    store = stores.score_store(s)
    store.write_songs([record("A")], s.feed.name)
    try:
        with TestClient(create_app(s)) as client:
            for headers in ({}, {"Authorization": f"Bearer {READ}"}):
                r = client.delete("/v1/songs/A", headers=headers)
                assert r.status_code == 403 and r.json()["error"] == "takedown_disabled"
        assert store.get_song("A") is not None
    finally:
        store.close()


def test_the_deleting_process_drops_the_song_from_its_table_at_once(settings: Settings) -> None:
    """Without waiting for the change log: the follower is stopped here, so only the DELETE itself can do it."""
    s = with_takedown(settings)
    store = stores.score_store(s)
    FeedWriter(s, store).on_scored([record("A", likes=90), record("B", likes=60)], now=NOW)
    read, admin = {"Authorization": f"Bearer {READ}"}, {"Authorization": f"Bearer {ADMIN}"}
    try:
        app = create_app(s)
        with TestClient(app) as client:
            client.portal.call(app.state.reader.sync.close)  # type: ignore[union-attr]
            assert client.delete("/v1/songs/A", headers=admin).status_code == 200
            page = client.get(f"/v1/feeds/{s.feed.name}", headers=read).json()
            assert [i["song_id"] for i in page["items"]] == ["B"]
            ranked = client.post("/v1/rank", json={"candidates": ["A", "B"]}, headers=read).json()
            assert ranked["unknown"] == ["A"]
    finally:
        store.close()


def test_retraining_leaves_out_songs_taken_down(settings: Settings) -> None:
    """Rows of a tombstoned song are dropped even where its hash and embedding are still there (a writer
    from before the takedown, a shard whose worker has not applied songs.deleted yet)."""
    store = stores.score_store(settings)
    created = datetime.now(UTC) - timedelta(hours=1)
    songs = [f"s.{i}" for i in range(4)]
    try:
        FeedWriter(settings, store).on_scored([record(s, now=created.timestamp()) for s in songs], now=NOW)
        with SqliteEmbeddingStore(settings.index_dir / STORE_FILE) as emb:
            emb.put_many([embedding(s, i) for i, s in enumerate(songs)])
        log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
        log.append(
            [LoggedEvent(f"e{i}", s, "u", "play", created, None, None, 0, i) for i, s in enumerate(songs + songs)]
        )
        before, _ = gather(settings, store)
        assert before.song_ids == songs
        store.delete_songs(["s.1"], "rights", list(settings.feed.feeds))
        raw = store.client  # type: ignore[attr-defined]
        raw.hset(
            f"{settings.redis.key_prefix}:song:{{s.1}}", mapping={"generator": "g", "created_at": created.isoformat()}
        )
        observed, features = gather(settings, store)
        assert observed.song_ids == ["s.0", "s.2", "s.3"] and features.song_ids == observed.song_ids
        assert list(observed.plays) == [2, 2, 2]
    finally:
        store.close()


def _tombstoned_metric(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('apexrank_feedback_events_total{outcome="tombstoned"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _read_deleted(settings: Settings, n: int) -> list[SongDeleted]:
    consumer = make_consumer(settings.kafka, f"read-{uuid.uuid4().hex[:8]}", [settings.kafka.topics.songs_deleted], 100)
    out: list[SongDeleted] = []
    try:
        deadline = time.monotonic() + 20
        while len(out) < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out += [SongDeleted.parse(r.value) for r in records]
    finally:
        consumer.close()
    return out


def test_a_running_worker_drops_taken_down_songs_and_skips_their_replays(settings: Settings, tmp_path: Path) -> None:
    """The worker side: songs.deleted takes the song out of this shard's store and FAISS index while the
    worker runs, and a replayed songs.generated of it is a no-op counted on /metrics."""
    import threading

    from prometheus_client import REGISTRY

    from consumers.publish import publish_events
    from consumers.worker import Worker
    from indexes.index_reader import IndexReader
    from tests.helpers import event, tone

    s = with_takedown(settings)
    audio = {x: tone(tmp_path / f"{x}.wav", seconds=1.5, freq=200.0 + 90 * i).as_uri() for i, x in enumerate("ab")}
    publish_events(s, [event(f"td-{x}", uri) for x, uri in audio.items()])
    first = Worker(s)
    assert first.run(until_idle_s=1.0, until_caught_up=True).scored == 2
    take_down(s, ["td-a"], "rights claim")
    publish_events(s, [event("td-a", audio["a"])])  # a replay of the song taken down
    skipped_before = REGISTRY.get_sample_value("apexrank_worker_tombstoned_total") or 0.0
    worker = Worker(s)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with SqliteEmbeddingStore(s.index_dir / STORE_FILE) as emb:
            ok = _wait(lambda: emb.contains(["td-a", "td-b"]) == {"td-b"} and worker.stats.tombstoned == 1, 40)
            assert ok, (worker.stats, emb.contains(["td-a", "td-b"]))
        assert worker.stats.takedowns == 1 and worker.stats.scored == 0
        assert not worker.index.contains("td-a") and worker.index.contains("td-b")
        assert REGISTRY.get_sample_value("apexrank_worker_tombstoned_total") == skipped_before + 1
    finally:
        worker.request_stop()
        thread.join(60)
    reader = IndexReader(s.index_dir, s.index.factory)
    try:
        assert reader.load().vectors == 1  # the snapshot written on the way out holds td-b alone
    finally:
        reader.close()
