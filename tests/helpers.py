"""Shared test helpers: audio files, events, reading topics, settings as environment variables."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
from kafka import KafkaConsumer

from ranker.events import SongGenerated
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


def url_of(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


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


def read_topic(settings: Settings, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Read a topic from the beginning until ``expect`` messages arrived (counting, not end offsets)."""
    consumer = KafkaConsumer(
        topic,
        group_id=f"reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        **settings.kafka.client_kwargs(),
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        # Drain briefly so that extra (unexpected) messages are seen too.
        for records in consumer.poll(timeout_ms=1000).values():
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
