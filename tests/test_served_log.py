"""Exposure logging (issue 16, item 5): the served record, random exploration slots with propensities,
the API's spool and shipper (complete after SIGKILL of the API), the served log beside the engagement
log (complete after SIGKILL of the consumer), and the impressions join. docs/served-log.md."""

from __future__ import annotations

import asyncio
import errno
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
from prometheus_client import REGISTRY

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics, flush_or_raise, make_producer
from consumers.stack import free_port
from indexes import RedisScoreStore
from indexes.engagement_log import EngagementLog
from indexes.served_log import ServedLog, impressions
from ranker.errors import InputError
from ranker.events import DeadLetter, Engagement, FeedServed
from ranker.serving import exposure
from ranker.serving.exposure import Shipper, Spool, served_record
from ranker.serving.producer import ApiProducer, Delivery
from ranker.serving.reader import FeedPage, FeedReader
from ranker.serving.writer import FeedWriter
from ranker.settings import FeedbackSettings, Settings
from tests.helpers import read_topic, settings_env
from tests.test_policy import NOW, plain, record, with_feeds

ROOT = Path(__file__).resolve().parents[1]


def own_topics(settings: Settings, tmp_path: Path) -> Settings:
    """This test's own feeds.served topic (conftest names the others) and spool directory."""
    tag = uuid.uuid4().hex[:8]
    topics = settings.kafka.topics.model_copy(update={"feeds_served": f"t{tag}.feeds.served"})
    kafka = settings.kafka.model_copy(update={"topics": topics})
    api = settings.api.model_copy(update={"served_spool_dir": tmp_path / "spool"})
    return settings.model_copy(update={"kafka": kafka, "api": api})


def publish(settings: Settings, topic: str, values: list[bytes], keys: list[bytes]) -> None:
    ensure_topics(settings.kafka, [topic])
    producer = make_producer(settings.kafka)
    try:
        flush_or_raise(producer, [producer.send(topic, key=k, value=v) for k, v in zip(keys, values, strict=True)])
    finally:
        producer.close()


def plays_for(items: list[tuple[str, str]]) -> list[Engagement]:
    """A play of each (request_id, song_id), and a like of every third."""
    out = []
    for n, (rid, song) in enumerate(items):
        for kind in ("play", "like") if n % 3 == 0 else ("play",):
            out.append(
                Engagement(
                    event_id=f"e-{uuid.uuid4().hex[:12]}",
                    song_id=song,
                    user_id="u1",
                    type=kind,
                    ts=datetime.now(UTC),
                    request_id=rid,
                )
            )
    return out


# -- the record ------------------------------------------------------------------------------------
def test_the_served_record_round_trips_and_bad_ones_are_refused() -> None:
    line = served_record(
        "r-1",
        "feed",
        "main",
        ["a", "b", "c"],
        user_id="u9",
        model_version="m-3",
        explored=[False, True, False],
        propensity=[1.0, 0.25, 1.0],
        pool=["b", "x", "y"],
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one spool line
    got = FeedServed.parse(line)
    assert (got.request_id, got.kind, got.feed, got.user_id, got.arm, got.model_version) == (
        "r-1",
        "feed",
        "main",
        "u9",
        None,
        "m-3",
    )
    assert (got.song_ids, got.explored, got.propensity, got.pool) == (
        ["a", "b", "c"],
        [False, True, False],
        [1.0, 0.25, 1.0],
        ["b", "x", "y"],
    )
    assert FeedServed.parse(got.to_bytes()) == got
    rank = FeedServed.parse(served_record("r-2", "rank", "main", ["a"]))
    assert (rank.explored, rank.propensity, rank.pool, rank.user_id) == ([False], [1.0], [], None)
    good = json.loads(line)
    bad = [
        {**good, "explored": [False, True]},  # lengths differ
        {**good, "propensity": [1.0, 0.0, 1.0]},  # an explored song had no chance
        {**good, "propensity": [0.5, 0.25, 1.0]},  # an exploit item is certain
        {**good, "pool": []},  # explored from nothing
        {**good, "kind": "search"},
        {**good, "surprise": 1},
        {**good, "song_ids": ["a"] * 2001, "explored": [False] * 2001, "propensity": [1.0] * 2001},
    ]
    for value in bad:
        with pytest.raises(InputError):
            FeedServed.parse(json.dumps(value).encode())


# -- random exploration slots ----------------------------------------------------------------------
def test_explore_positions_vary_and_propensities_match_how_often_songs_are_explored(
    settings: Settings, store: RedisScoreStore
) -> None:
    s = with_feeds(settings, {"x": plain(explore_share=0.1, explore_pool=20, half_life_hours=None)}, calibrate=False)
    FeedWriter(s, store).on_scored([record(f"s{i:03d}", likes=100 - i * 1.5) for i in range(80)], now=NOW)

    async def pages(n: int) -> list[FeedPage]:
        reads = store.async_reads()
        try:
            reader = FeedReader(s, reads, clock=lambda: NOW)
            await reader.sync.load()
            rng = np.random.default_rng(11)
            return [await reader.page("x", 50, rng=rng) for _ in range(n)]
        finally:
            await reads.close()

    got = asyncio.run(pages(300))
    layouts: Counter[tuple[int, ...]] = Counter()
    explored_at: defaultdict[str, list[float]] = defaultdict(list)
    for page in got:
        flags = [bool(i["explore"]) for i in page.items]
        layouts[tuple(n for n, f in enumerate(flags) if f)] += 1
        assert sum(flags) == 5 and len(page.propensity) == 50
        assert page.pool == [f"s{i:03d}" for i in range(45, 65)]  # just below the exploit slots
        for item, p in zip(page.items, page.propensity, strict=True):
            if item["explore"]:
                assert 0 < p <= 1 and item["song_id"] in page.pool
                explored_at[item["song_id"]].append(p)
            else:
                assert p == 1.0
    assert len(layouts) > 250, "exploration slots must move from page to page"
    positions = Counter(n for layout in layouts.elements() for n in layout)
    assert min(positions[n] for n in range(50)) > 0  # every position is used, the top one too
    # Each song's propensity is the chance it is explored. Given that it was, the realised draw counts 1
    # of 32 and the 31 further draws are independent of it: (32 p - 1) / 31 estimates that chance, which
    # over many pages is how often the song was explored; the pool's chances add up to the slots.
    share = {song: len(ps) / len(got) for song, ps in explored_at.items()}
    chance = {song: (32 * float(np.mean(ps)) - 1) / 31 for song, ps in explored_at.items()}
    assert max(share.values()) > 0.4 and min(share.values()) < 0.1  # songs' chances differ widely
    assert sum(chance.values()) == pytest.approx(5, abs=0.25)
    for song in share:
        assert chance[song] == pytest.approx(share[song], abs=0.08), (song, share[song], chance[song])


# -- the API's spool, after SIGKILL ----------------------------------------------------------------
def get(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str]:
    """GET ``path``, or POST ``body`` to it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}"), r.getheader("X-Request-ID") or ""
    finally:
        conn.close()


def start_api(settings: Settings, port: int, **env: str) -> subprocess.Popen[bytes]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}, **settings_env(settings), **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if get(port, "/readyz")[1]["table"]["ready"]:
                return proc
        except (OSError, KeyError):
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the API did not start"
        time.sleep(0.2)


def test_the_spool_survives_a_sigkilled_api_and_the_join_is_complete(
    settings: Settings, store: RedisScoreStore, tmp_path: Path
) -> None:
    s = own_topics(settings, tmp_path)
    FeedWriter(s, store).on_scored([record(f"k{i:03d}", likes=90 - i) for i in range(60)], now=NOW)
    port = free_port()
    # No shipping while it serves (the first pass at start finds nothing): every record is in the spool.
    proc = start_api(s, port, APEXRANK_API__SERVED_SHIP_INTERVAL_S="3600")
    shown: list[tuple[str, str]] = []
    received: list[str] = []
    try:
        for n in range(12):
            status, body, header = get(port, f"/v1/feeds/{s.feed.name}?limit=10" + ("&user=u1" if n % 2 else ""))
            assert status == 200 and body["request_id"] == header
            received.append(body["request_id"])
            shown += [(body["request_id"], i["song_id"]) for i in body["items"]]
        status, body, _ = get(port, "/v1/rank", {"candidates": ["k003", "k001", "k002"], "user": "u2"})
        assert status == 200
        ranked = body["request_id"]
        received.append(ranked)
        shown += [(ranked, i["song_id"]) for i in body["items"]]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    spooled = list((tmp_path / "spool").glob("*.jsonl"))
    assert spooled and sum(p.stat().st_size for p in spooled) > 0  # nothing was shipped before the kill

    # Another process's shipper adopts the killed one's file (its lock is free), ships it and deletes it.
    producer = ApiProducer(s.kafka)
    spool = Spool(tmp_path / "spool", 1 << 20)
    try:
        shipper = Shipper(spool, producer.publish, s.kafka.topics.feeds_served, 0.1)
        assert shipper.ship_once() == len(received)
        assert not [p for p in (tmp_path / "spool").glob("*.jsonl") if p != spool.path]
    finally:
        spool.close()
        producer.close()

    events = plays_for(shown[::4])
    publish(s, s.kafka.topics.engagement, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    FeedbackConsumer(s, on_engagement=lambda ids: None).run(until_idle_s=2.0, until_caught_up=True)
    served = ServedLog(s.served_log_dir, s.kafka.topics.feeds_served).read()
    assert set(served.column("request_id").to_pylist()) == set(received)
    assert set(served.column("model_version").to_pylist()) == {"test-1"}  # the songs' model
    by_kind = Counter(zip(served["kind"].to_pylist(), served["user_id"].to_pylist(), strict=True))
    assert by_kind == {("feed", None): 6, ("feed", "u1"): 6, ("rank", "u2"): 1}
    joined = impressions(served, EngagementLog(s.engagement_log_dir, s.kafka.topics.engagement).read())
    assert joined.num_rows == len(shown)
    keys = list(zip(joined["request_id"].to_pylist(), joined["song_id"].to_pylist(), strict=True))
    assert sorted(keys) == sorted(shown)
    engaged = set(shown[::4])
    liked = set(shown[::4][::3])
    assert dict(zip(keys, joined["plays"].to_pylist(), strict=True)) == {k: int(k in engaged) for k in shown}
    assert dict(zip(keys, joined["likes"].to_pylist(), strict=True)) == {k: int(k in liked) for k in shown}
    explored = joined.filter(joined["explored"])
    assert explored.num_rows == 12 and all(p is not None for p in explored["pool"].to_pylist())
    rank = joined.filter(pc.equal(joined["kind"], "rank"))
    assert rank["position"].to_pylist() == [0, 1, 2] and set(rank["propensity"].to_pylist()) == {1.0}


# -- the consumer, after SIGKILL -------------------------------------------------------------------
def test_a_sigkilled_consumer_leaves_both_logs_complete(settings: Settings, tmp_path: Path) -> None:
    s = own_topics(settings, tmp_path).model_copy(update={"feedback": FeedbackSettings(max_poll_records=200)})
    served = [
        FeedServed.parse(served_record(f"r{n:05d}", "rank", "main", [f"a{n % 50}", f"b{n % 70}"])) for n in range(4000)
    ]
    publish(s, s.kafka.topics.feeds_served, [r.to_bytes() for r in served], [r.request_id.encode() for r in served])
    events = plays_for([(r.request_id, r.song_ids[0]) for r in served[:2000]])
    publish(s, s.kafka.topics.engagement, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    env = {**os.environ, **settings_env(s)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "feedback"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log_dir = s.served_log_dir
    deadline = time.monotonic() + 90
    try:
        while len(list(log_dir.glob("day=*/*.parquet"))) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "the consumer logged nothing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = ServedLog(log_dir, s.kafka.topics.feeds_served).read().num_rows
    assert 0 < partial < len(served), "the kill must land while work is in flight"

    FeedbackConsumer(s, on_engagement=lambda ids: None).run(until_idle_s=2.0, until_caught_up=True)
    logged = ServedLog(log_dir, s.kafka.topics.feeds_served).read()
    rids = logged.column("request_id").to_pylist()
    assert Counter(rids).most_common(1)[0][1] == 1 and set(rids) == {r.request_id for r in served}
    engaged = EngagementLog(s.engagement_log_dir, s.kafka.topics.engagement).read()
    ids = engaged.column("event_id").to_pylist()
    assert Counter(ids).most_common(1)[0][1] == 1 and len(ids) == len(events)
    joined = impressions(logged, engaged)
    assert joined.num_rows == 2 * len(served)
    assert sum(joined["plays"].to_pylist()) == 2000 and sum(joined["likes"].to_pylist()) == 667


def test_a_bad_served_record_goes_to_the_dead_letter_topic(settings: Settings, tmp_path: Path) -> None:
    s = own_topics(settings, tmp_path)
    good = served_record("r-good", "rank", "main", ["a"])
    bad = [b"not json", served_record("r-bad", "rank", "main", ["a"], explored=[True], propensity=[0.5])]
    topic = s.kafka.topics.feeds_served
    publish(s, topic, [good, *bad], [b"r-good", b"x", b"r-bad"])
    stats = FeedbackConsumer(s, on_engagement=lambda ids: None).run(until_idle_s=2.0, until_caught_up=True)
    assert stats.dead_letters == 2 and stats.served == 1 and stats.accepted == 0
    letters = [DeadLetter.model_validate_json(m.value) for m in read_topic(s, s.kafka.topics.engagement_dead_letter, 2)]
    assert sorted(d.original_bytes() for d in letters) == sorted(bad)
    assert {d.source_topic for d in letters} == {topic}
    assert {d.error_code for d in letters} == {"invalid_json", "invalid_schema"}
    assert ServedLog(s.served_log_dir, topic).read().column("request_id").to_pylist() == ["r-good"]


def test_a_full_spool_drops_and_counts_then_ships_once_kafka_is_back(settings: Settings, tmp_path: Path) -> None:
    s = own_topics(settings, tmp_path)
    down = s.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_ms": 1000})
    spool = Spool(tmp_path / "spool", 1 << 16)
    line = served_record("r-0", "rank", "main", ["a"] * 100)
    written = sum(spool.write(line.replace(b"r-0", f"r-{n}".encode())) for n in range(200))
    assert 0 < written < 200 and spool.dropped == 200 - written
    offline = ApiProducer(down)
    try:
        assert Shipper(spool, offline.publish, s.kafka.topics.feeds_served, 1).ship_once() == 0
    finally:
        offline.close()
    assert spool.backlog >= written * len(line) - 1000  # still waiting, nothing lost
    producer = ApiProducer(s.kafka)
    try:
        assert Shipper(spool, producer.publish, s.kafka.topics.feeds_served, 1).ship_once() == written
    finally:
        producer.close()
        spool.close()
    assert len(read_topic(s, s.kafka.topics.feeds_served, written)) == written


def test_a_backlog_ships_in_bounded_reads_and_a_failing_kafka_is_retried_ever_later(
    settings: Settings, tmp_path: Path
) -> None:
    """A pass reads at most ``read_bytes`` of a spool file (a large backlog is not read whole, every pass), and
    while publishing fails the shipper waits longer each time instead of trying twice a second."""
    s = own_topics(settings, tmp_path)
    spool = Spool(tmp_path / "spool", 1 << 24)
    line = served_record("r-0", "rank", "main", ["a"] * 20)
    for n in range(60):
        spool.write(line.replace(b"r-0", f"r-{n:02d}".encode()))
    producer = ApiProducer(s.kafka)
    try:
        shipper = Shipper(
            spool, producer.publish, s.kafka.topics.feeds_served, 1, read_bytes=10 * (len(line) + 2)
        )  # r-NN: one byte longer, plus the newline
        passes = [shipper.ship_once() for _ in range(8)]
        assert passes[:6] == [10] * 6 and passes[6:] == [0, 0], passes  # ten lines a pass, then done
        assert spool.backlog == 0
    finally:
        producer.close()
    assert len(read_topic(s, s.kafka.topics.feeds_served, 60)) == 60

    calls: list[float] = []

    def failing(topic: str, records: Sequence[Any]) -> list[Delivery]:
        calls.append(time.monotonic())
        return [Delivery("broker down")] * len(records)

    spool.write(line)
    shipper = Shipper(spool, failing, "nowhere", 0.05)
    shipper.start()
    time.sleep(1.6)
    shipper._stop.set()
    spool.close()
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert 3 <= len(calls) <= 7, calls  # 0.05, 0.1, 0.2, 0.4, 0.8 s apart: not 30 tries in 1.6 s
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps


def test_a_killed_process_s_unfinished_last_record_is_dropped_and_its_file_finished(
    settings: Settings, tmp_path: Path
) -> None:
    """Killed inside a write (a record of several pages can be written part way), a process leaves its last
    line without its newline. Adopted, the file ships every whole record once, drops that one (counted) and
    goes with its checkpoint: it is not adopted again every pass, and the backlog comes back to 0."""
    s = own_topics(settings, tmp_path)
    lines = [served_record(f"r-{n}", "rank", "main", ["a"] * 20) for n in range(4)]
    dead = tmp_path / "spool" / "served-999999-1-1.jsonl"  # no live process holds its lock
    dead.parent.mkdir()
    dead.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    dropped = REGISTRY.get_sample_value("apexrank_api_served_dropped_total") or 0.0
    spool = Spool(tmp_path / "spool", 1 << 20)
    producer = ApiProducer(s.kafka)
    try:
        shipper = Shipper(spool, producer.publish, s.kafka.topics.feeds_served, 1, read_bytes=2 * len(lines[0]))
        assert [shipper.ship_once() for _ in range(3)] == [2, 1, 0]  # from its checkpoint on the second pass
        assert list((tmp_path / "spool").iterdir()) == [spool.path] and spool.backlog == 0
    finally:
        producer.close()
        spool.close()
    assert REGISTRY.get_sample_value("apexrank_api_served_dropped_total") == dropped + 1
    shipped = [FeedServed.parse(m.value).request_id for m in read_topic(s, s.kafka.topics.feeds_served, 3)]
    assert sorted(shipped) == ["r-0", "r-1", "r-2"]


def test_a_write_cut_short_is_finished_or_taken_back_never_glued_to_the_next(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write can put down fewer bytes than asked (a signal, a disk filling up): the rest is written, or, when
    the disk is full, the part written is cut off and the record dropped and counted, so the next record starts
    its own line."""
    s = own_topics(settings, tmp_path)
    lines = [served_record(f"w-{n}", "rank", "main", ["a"] * 20) for n in range(4)]
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.write(lines[0])
    monkeypatch.setattr(exposure, "_write_some", lambda fd, data: os.write(fd, data[: max(1, len(data) // 3)]))
    assert spool.write(lines[1])  # in three writes
    assert spool.path.read_bytes() == lines[0] + lines[1]

    def fills(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_size > len(lines[0]) + len(lines[1]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data[: len(data) // 2])

    monkeypatch.setattr(exposure, "_write_some", fills)
    assert not spool.write(lines[2]) and spool.dropped == 1
    monkeypatch.setattr(exposure, "_write_some", os.write)
    assert spool.write(lines[3])
    assert spool.path.read_bytes() == lines[0] + lines[1] + lines[3]
    producer = ApiProducer(s.kafka)
    try:
        assert Shipper(spool, producer.publish, s.kafka.topics.feeds_served, 1).ship_once() == 3
    finally:
        producer.close()
        spool.close()
    shipped = [FeedServed.parse(m.value).request_id for m in read_topic(s, s.kafka.topics.feeds_served, 3)]
    assert sorted(shipped) == ["w-0", "w-1", "w-3"]


def test_a_batch_logged_but_not_committed_is_logged_once_when_replayed(settings: Settings, tmp_path: Path) -> None:
    """The crash window a SIGKILL cannot aim at: both logs written, the offsets not committed. The next consumer
    polls the batch again from the last commit and must write nothing twice (each file covers offsets no other
    file does: checked on the files themselves, not through the read's own deduplication)."""
    import pyarrow.parquet as pq

    from consumers.loop import message_of

    s = own_topics(settings, tmp_path)
    served = [FeedServed.parse(served_record(f"q{n:04d}", "rank", "main", [f"a{n}"])) for n in range(300)]
    publish(s, s.kafka.topics.feeds_served, [r.to_bytes() for r in served], [r.request_id.encode() for r in served])
    events = plays_for([(r.request_id, r.song_ids[0]) for r in served[:100]])
    publish(s, s.kafka.topics.engagement, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])
    polled = read_topic(s, s.kafka.topics.feeds_served, len(served)) + read_topic(
        s, s.kafka.topics.engagement, len(events)
    )
    assert len(polled) == len(served) + len(events)

    crashed = FeedbackConsumer(s, on_engagement=lambda ids: None)
    # Steps 1-4 for the first 120 records of each partition, then the process dies before the commit: the next
    # consumer's batches start at offset 0 again and end elsewhere, so their files' ranges overlap these.
    first = [r for r in polled if r.offset < 120]
    crashed.process([message_of(r) for r in first])
    FeedbackConsumer(s, on_engagement=lambda ids: None).run(
        until_idle_s=2.0, until_caught_up=True
    )  # from offset 0 again

    def rows_on_disk(directory: Path) -> int:
        return sum(pq.read_metadata(f).num_rows for f in directory.glob("day=*/*.parquet"))

    assert rows_on_disk(s.served_log_dir) == len(served)
    assert rows_on_disk(s.engagement_log_dir) == len(events)
    joined = impressions(
        ServedLog(s.served_log_dir, s.kafka.topics.feeds_served).read(),
        EngagementLog(s.engagement_log_dir, s.kafka.topics.engagement).read(),
    )
    assert sum(joined["plays"].to_pylist()) == 100 and sum(joined["likes"].to_pylist()) == 34
