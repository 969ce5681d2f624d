"""``apexrank dead-letters list|replay`` on the real embedded broker and Redis.

The dead letters are the worker's and the feedback consumer's own: songs whose audio URI answers
404 from a loopback HTTP server (then, once "fixed", a real WAV), an unsupported URI scheme, a value
that is not JSON. The commands run in-process through ``consumers.cli.main`` with the test's settings
in the environment, as an operator would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from consumers.cli import main
from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import ensure_topics
from consumers.publish import publish_events
from consumers.worker import Worker
from ranker.settings import AudioSettings, Settings
from tests.helpers import AudioServer, audio_server, event, read_topic, settings_env

ROOT = Path(__file__).resolve().parents[1]
Cli = Callable[..., tuple[int, str]]


@pytest.fixture
def audio(tmp_path: Path) -> Iterator[AudioServer]:
    """Every song's audio is missing (404) until ``audio.fix()``, then a real WAV."""
    with audio_server(tmp_path, missing=True) as server:
        yield server


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test's settings, with loopback HTTP fetches allowed (the audio server)."""
    return settings.model_copy(update={"audio": AudioSettings(fetch_timeout_s=3.0, allow_private_networks=True)})


def cli_for(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``apexrank ARGS`` in-process with ``settings`` in the environment; returns (exit code, stdout)."""
    for name in [k for k in os.environ if k.startswith("APEXRANK_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(list(argv))
        return rc, capsys.readouterr().out

    return run


def report(cli: Cli, *argv: str) -> dict[str, Any]:
    """A command's --json report, per --topic choice."""
    rc, out = cli("dead-letters", *argv, "--json")
    assert rc == 0, out
    return {t["topic"]: t for t in json.loads(out)["topics"]}


def end_total(settings: Settings, topic: str) -> int:
    """Records ever written to ``topic``: the high watermarks its fetch responses report.

    Not ``end_offsets()``: the embedded Tansu answers ListOffsets with the last batch's base offset + 1.
    """
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        if not parts:
            return 0
        consumer.assign(parts)
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            marks = [consumer.highwater(tp) for tp in parts]
            if all(m is not None and consumer.position(tp) >= m for tp, m in zip(parts, marks, strict=True)):
                return sum(m for m in marks if m is not None)
        raise AssertionError(f"{topic}: no high watermarks within 30 s")
    finally:
        consumer.close()


def produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    ensure_topics(settings.kafka, [topic])
    producer = KafkaProducer(acks="all", **settings.kafka.client_kwargs())
    try:
        for value in values:
            producer.send(topic, value=value).get(timeout=30)
    finally:
        producer.close()


def run_worker(settings: Settings) -> Worker:
    worker = Worker(settings)
    worker.run(until_idle_s=2.0, until_caught_up=True)
    return worker


def test_list_counts_the_letters_by_code(
    settings: Settings, audio: AudioServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    topics = settings.kafka.topics
    started = datetime.now(UTC)
    bad = [event("h-1", audio.uri("h-1")), event("h-2", audio.uri("h-2")), event("ftp-1", "ftp://example.org/a.wav")]
    publish_events(settings, bad, raw=[b"{not json"])
    worker = run_worker(settings)
    assert worker.stats.dead_letters == 4
    produce(settings, topics.engagement, [b"{not an engagement"])
    assert (
        FeedbackConsumer(settings, on_engagement=lambda ids: None)
        .run(until_idle_s=2.0, until_caught_up=True)
        .dead_letters
        == 1
    )
    produce(settings, topics.dead_letter, [b"not a dead letter"])
    cli = cli_for(settings, monkeypatch, capsys)

    every = report(cli, "list")
    songs, engagement = every["songs"], every["engagement"]
    assert songs["dead_letter_topic"] == topics.dead_letter and songs["source_topic"] == topics.songs_generated
    assert {c: v["count"] for c, v in songs["codes"].items()} == {
        "http_error": 2,
        "unsupported_uri_scheme": 1,
        "invalid_json": 1,
    }
    assert songs["letters"] == 5 and songs["matched"] == 4 and songs["not_letters"] == 1
    http = songs["codes"]["http_error"]
    assert http["replayable"] == 2 and http["truncated"] == 0
    assert started <= datetime.fromisoformat(http["first"]) <= datetime.fromisoformat(http["last"])
    assert sorted(e["key"] for e in http["examples"]) == ["h-1", "h-2"]
    assert all("404" in e["message"] for e in http["examples"])
    assert songs["skipped_unparseable"] == {"invalid_json": 1}
    assert {c: v["count"] for c, v in engagement["codes"].items()} == {"invalid_json": 1}
    assert engagement["source_topic"] == topics.engagement

    only = report(cli, "list", "--topic", "songs", "--code", "http_error")
    assert list(only) == ["songs"] and list(only["songs"]["codes"]) == ["http_error"]
    assert only["songs"]["matched"] == 2

    assert report(cli, "list", "--since", "1h")["songs"]["matched"] == 4
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert report(cli, "list", "--since", future)["songs"]["matched"] == 0

    rc, text = cli("dead-letters", "list", "--topic", "songs")
    assert rc == 0
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("http_error "))
    assert row[1] == "2"  # the count column
    assert "h-1" in text and "404" in text

    assert cli("dead-letters", "list", "--since", "yesterday")[0] == 2


def test_replay_after_the_fix_scores_the_song_once(
    settings: Settings, audio: AudioServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    topics = settings.kafka.topics
    song = event("h-1", audio.uri("h-1"))
    publish_events(settings, [song], raw=[b"{not json"])
    assert run_worker(settings).stats.dead_letters == 2
    cli = cli_for(settings, monkeypatch, capsys)
    before = end_total(settings, topics.songs_generated)
    assert before == 2

    dry = report(cli, "replay", "--topic", "songs", "--dry-run")["songs"]
    assert dry["replayable"] == 1 and dry["republished"] == 0
    assert dry["skipped_unparseable"] == {"invalid_json": 1} and dry["skipped_truncated"] == {}
    assert end_total(settings, topics.songs_generated) == before, "a dry run published"

    audio.fix()
    rc, text = cli("dead-letters", "replay", "--topic", "songs")
    assert rc == 0
    assert f"{topics.dead_letter} -> {topics.songs_generated}: republished 1 of 2" in text
    assert "invalid_json: republished 0; 1 not replayable: the original is unparseable" in text
    assert end_total(settings, topics.songs_generated) == before + 1
    sent = read_topic(settings, topics.songs_generated, before + 1)
    assert [m.value for m in sent if m.key == b"h-1"] == [song.to_bytes()] * 2  # the event, then its replay

    worker = run_worker(settings)
    assert worker.stats.scored == 1 and worker.stats.dead_letters == 0
    first = worker.store.get_song("h-1")
    assert first is not None
    assert [m.key for m in read_topic(settings, topics.songs_scored, 1)] == [b"h-1"]

    # Replaying again republishes again (replay keeps no record); the worker absorbs the duplicate.
    again = report(cli, "replay", "--topic", "songs", "--code", "http_error")["songs"]
    assert again["republished"] == 1
    assert end_total(settings, topics.songs_generated) == before + 2
    worker = run_worker(settings)
    assert worker.stats.reused_embeddings == 1 and worker.stats.dead_letters == 0
    assert worker.store.get_song("h-1") == first


def test_a_truncated_original_is_reported_as_not_replayable(
    settings: Settings, audio: AudioServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"dead_letter_original_bytes": 40})}
    )
    topics = settings.kafka.topics
    publish_events(settings, [event("h-1", audio.uri("h-1")), event("ftp-1", "ftp://example.org/a.wav")])
    assert run_worker(settings).stats.dead_letters == 2
    audio.fix()
    cli = cli_for(settings, monkeypatch, capsys)
    before = end_total(settings, topics.songs_generated)

    listed = report(cli, "list", "--topic", "songs")["songs"]
    assert {c: (v["count"], v["replayable"], v["truncated"]) for c, v in listed["codes"].items()} == {
        "http_error": (1, 0, 1),
        "unsupported_uri_scheme": (1, 0, 1),
    }

    replay = report(cli, "replay", "--topic", "songs")["songs"]
    assert replay["republished"] == 0
    assert replay["skipped_truncated"] == {"http_error": 1, "unsupported_uri_scheme": 1}
    assert "keeps 40 of" in replay["codes"]["http_error"]["examples"][0]["replay"]
    rc, text = cli("dead-letters", "replay", "--topic", "songs", "--code", "http_error")
    assert rc == 0 and "http_error: republished 0; 1 not replayable: the original was truncated" in text
    assert end_total(settings, topics.songs_generated) == before


def test_an_absent_topic_reads_as_empty_and_is_not_created(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = cli_for(settings, monkeypatch, capsys)
    started = time.monotonic()
    both = report(cli, "replay")
    assert time.monotonic() - started < 20
    assert {name: (t["letters"], t["republished"]) for name, t in both.items()} == {
        "songs": (0, 0),
        "engagement": (0, 0),
    }
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    topics = settings.kafka.topics
    assert not existing & {topics.dead_letter, topics.engagement_dead_letter, topics.songs_generated}


#: Runs ``apexrank ARGS`` and writes to stderr which of these modules it had imported at exit.
WRAPPER = """
import atexit, sys
WATCH = ("torch", "transformers", "faiss", "kafka")
atexit.register(lambda: sys.stderr.write("LOADED=" + ",".join(m for m in WATCH if m in sys.modules) + "\\n"))
from consumers.cli import main
sys.argv[0] = "apexrank"
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("argv", "loaded"),
    [
        (["dead-letters", "--help"], ""),
        (["dead-letters", "replay", "--help"], ""),
        (["dead-letters", "list"], "kafka"),  # the command itself: Kafka, never the model stack
    ],
    ids=["dead-letters --help", "dead-letters replay --help", "dead-letters list"],
)
def test_dead_letters_start_up_light(argv: list[str], loaded: str, settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")} | settings_env(settings)
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    markers = [line for line in proc.stderr.splitlines() if line.startswith("LOADED=")]
    assert markers and markers[-1] == f"LOADED={loaded}", proc.stderr[-2000:]
