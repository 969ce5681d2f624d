"""Shared test helpers: audio files, events, reading topics, settings as environment variables."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
from kafka import KafkaConsumer, TopicPartition

from consumers.loop import Message, caught_up
from indexes.base import faiss_id
from ranker.events import Engagement, SongGenerated
from ranker.settings import Settings

S = TypeVar("S", bound=ThreadingHTTPServer)


class CountingHTTPServer(ThreadingHTTPServer):
    """A loopback HTTP server that counts the TCP connections it accepts (connection reuse tests)."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.accepted = 0

    def get_request(self) -> tuple[Any, Any]:
        conn = super().get_request()
        self.accepted += 1
        return conn


@contextmanager
def serving(httpd: S) -> Iterator[S]:
    """Run ``httpd`` on a thread for the block, then shut it down and close its socket."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 90.0) -> None:
    """Poll ``predicate`` until it holds (a wait for asynchronous work, not a timed assertion).

    An exception from it counts as "not yet": a dependency may be down while we poll.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def url_of(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


@contextmanager
def loopback(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a free loopback port for the block; yields the server's base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True  # a handler still sleeping does not hold up the shutdown
    with serving(httpd):
        yield url_of(httpd)


#: ``AudioServer.failures`` value: answer 503 to every request.
ALWAYS = -1


class AudioServer:
    """Loopback audio whose answer per song the test sets: song NAME answers 503 for its first
    ``failures[NAME]`` requests (``ALWAYS``: every one), 404 while ``missing`` or NAME is in ``gone``,
    else the WAV. ``hits[NAME]`` holds the wall-clock time of each request."""

    def __init__(self, wav: bytes, missing: bool = False) -> None:
        self.failures: dict[str, int] = {}
        self.gone: set[str] = set()
        self.missing = missing
        self.hits: dict[str, list[float]] = defaultdict(list)
        lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.strip("/").removesuffix(".wav")
                with lock:
                    before = len(state.hits[name])
                    state.hits[name].append(time.time())
                    failures = state.failures.get(name, 0)
                if failures == ALWAYS or before < failures:
                    self.send_error(503, "try again later")
                    return
                if state.missing or name in state.gone:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(wav)))
                self.end_headers()
                self.wfile.write(wav)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = CountingHTTPServer(Handler)

    def fix(self) -> None:
        """Every song that was ``missing`` serves its WAV from now on."""
        self.missing = False

    def uri(self, name: str) -> str:
        return f"{url_of(self.httpd)}/{name}.wav"


@contextmanager
def audio_server(tmp_path: Path, missing: bool = False) -> Iterator[AudioServer]:
    """An :class:`AudioServer` serving a two-second tone, running for the block."""
    server = AudioServer(tone(tmp_path / "served.wav").read_bytes(), missing=missing)
    with serving(server.httpd):
        yield server


def tone(path: Path, seconds: float = 2.0, sr: int = 24_000, freq: float = 440.0, seed: int = 0) -> Path:
    """A short, clearly non-silent WAV: a tone with a few harmonics and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = sum(0.3 / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 4))
    y = y + 0.01 * rng.standard_normal(len(t))
    sf.write(path, y.astype(np.float32), sr)
    return path


def event(song_id: str, uri: str, generator: str = "suno-v5", **kw: Any) -> SongGenerated:
    return SongGenerated(song_id=song_id, audio_uri=uri, generator=generator, created_at=datetime.now(UTC), **kw)


def engagement(song_id: str, kind: str, offset: int, topic: str) -> Message:
    """An engagement event by user u1, as the feedback consumer polls it (partition 0 at ``offset``)."""
    ev = Engagement(
        event_id=f"e-{uuid.uuid4().hex[:12]}", song_id=song_id, user_id="u1", type=kind, ts=datetime.now(UTC)
    )
    return Message(topic, 0, offset, song_id.encode(), ev.to_bytes())


def read_topic(settings: Settings, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Read a topic from the beginning until ``expect`` messages arrived (counting), then on to its end.

    Its partitions are assigned, not joined as a group: a join would cost a second or more.
    """
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka.client_kwargs())
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not (partitions := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.1)  # not created yet
        if not partitions:
            return out
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        # Read on to the end so that extra (unexpected) messages are seen too.
        while not caught_up(consumer) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as APEXRANK_* environment variables, for a worker in a subprocess."""
    data = settings.model_dump(mode="json")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    env: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.split("__")[-1] not in ("weights",):
            for k, v in value.items():
                walk(f"{prefix}__{k}" if prefix else k, v)
        elif value is not None:
            env[f"APEXRANK_{prefix.upper()}"] = value if isinstance(value, str) else json.dumps(value)

    walk("", data)
    return env


class DictVectors:
    """Song vectors held in a dict, read the ways the feed reader reads an index (its VectorSource):
    for tests that hand the reader chosen vectors rather than a built index."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.table = vectors

    def vectors(self, song_ids: Sequence[str], keys: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        return {s: self.table[s] for s in song_ids if s in self.table}

    def vector_matrix(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        by_key = {faiss_id(s): v for s, v in self.table.items()}
        asked = np.asarray(keys, np.int64).tolist()
        found = np.array([k in by_key for k in asked], np.bool_)
        dim = len(next(iter(self.table.values()))) if self.table and found.any() else 0
        matrix = np.zeros((len(asked), dim), np.float32)
        for n, k in enumerate(asked):
            if k in by_key and dim:
                matrix[n] = by_key[k]
        return found, matrix

    def mean_direction(self) -> np.ndarray | None:
        return None


class WavHandler(BaseHTTPRequestHandler):
    """Serves ``wav`` at every path, except ``/missing...`` (404), ``/slow...`` (after 3 s) and
    ``/held/...`` (once ``release`` is set: a fetch stuck while the rest of the work goes on)."""

    wav = b""
    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/held/"):
            self.release.wait(timeout=120)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.wav)))
        self.end_headers()
        self.wfile.write(self.wav)

    def log_message(self, *args: object) -> None:
        pass
