"""``apexrank serve --workers N``: N processes on one port, each taking its share of new connections."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from consumers.stack import free_port
from indexes import RedisScoreStore
from ranker.serving.writer import FeedWriter
from ranker.settings import Settings
from tests.helpers import settings_env
from tests.test_song_table import NOW, record

ROOT = Path(__file__).resolve().parents[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a new connection (the kernel picks the process for each connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def cpu_by_child(parent: int) -> dict[int, float]:
    """CPU seconds of each API process the parent started (its children running the app)."""
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def start(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """``apexrank serve --workers 2``, once both processes have loaded their song table."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}, **settings_env(settings)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while len(cpu_by_child(proc.pid)) < 2 or not all(ready(port) for _ in range(10)):
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not become ready"
        time.sleep(0.2)
    return proc


def ready(port: int) -> bool:
    try:
        return bool(json.loads(get(port, "/readyz")[1])["table"]["ready"])  # no index here: the table alone
    except OSError:
        return False


def test_workers_share_the_port_and_stop_together(settings: Settings, store: RedisScoreStore) -> None:
    FeedWriter(settings, store).on_scored([record("a"), record("b")], now=NOW)
    port = free_port()
    proc = start(settings, port)
    try:
        before = cpu_by_child(proc.pid)
        for _ in range(300):  # a new connection each: the kernel spreads them over the processes
            status, body = get(port, f"/v1/feeds/{settings.feed.name}")
            assert status == 200 and b'"song_id":"a"' in body
        after = cpu_by_child(proc.pid)
        busy = {pid: after[pid] - before[pid] for pid in before}
        assert len(busy) == 2 and all(seconds > 0.05 for seconds in busy.values()), busy  # both served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "with 2 processes (SO_REUSEPORT)" in out, out[-2000:]


def test_no_api_process_outlives_a_killed_parent(settings: Settings) -> None:
    port = free_port()
    proc = start(settings, port)
    children = list(cpu_by_child(proc.pid))
    proc.kill()  # SIGKILL: nothing forwarded; the children notice on their own
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and b"spawn_main" in _cmdline(pid) for pid in children):
        assert time.monotonic() < deadline, "an API process outlived its parent"
        time.sleep(0.2)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_child_that_dies_unasked_stops_the_set_with_a_failure(settings: Settings) -> None:
    """An orchestrator restarting on failure must see it: the parent stops the others and exits non-zero."""
    port = free_port()
    proc = start(settings, port)
    try:
        first, second = list(cpu_by_child(proc.pid))
        os.kill(first, signal.SIGTERM)  # not from the parent: a crash, as far as it knows
        assert proc.wait(timeout=60) != 0
        assert not (Path(f"/proc/{second}").exists() and b"spawn_main" in _cmdline(second))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_shared_socket_resolves_its_host() -> None:
    """Names and IPv6 literals are bound as the system resolves them (a name is not an IPv4 address)."""
    from consumers.serve import reuse_port_socket

    for host, family in (("localhost", socket.AF_INET), ("::1", socket.AF_INET6), ("[::1]", socket.AF_INET6)):
        sock = reuse_port_socket(host, 0)
        try:
            assert sock.family == family, host
        finally:
            sock.close()
