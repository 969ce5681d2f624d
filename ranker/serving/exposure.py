"""What the API served, recorded before the response leaves and shipped to ``feeds.served``.

Each API process appends one JSON line per feed or rank response to its own spool file (one
``os.write`` on an ``O_APPEND`` descriptor: microseconds, and in the page cache at once, so a
SIGKILLed process loses nothing it answered). A shipper thread publishes new lines through the
process's :class:`~ranker.serving.producer.ApiProducer` (key = request_id) and then moves the
file's checkpoint (a small file, atomically replaced) past what the broker acknowledged. Files
rotate at a size bound and are deleted once shipped.

Each process holds an exclusive ``flock`` on its own spool file; a file whose lock can be taken
belongs to no live process (a killed one's, or one rotated out), and any shipper adopts it, ships
it to its end and deletes it, at start and every cycle. At-least-once: a crash between the publish
and the checkpoint ships lines again (readers dedup by request_id). With Kafka down the spool grows
up to ``api.served_spool_max_bytes``; beyond it new records are dropped, counted and warned about,
never blocking or failing a response; so is a record a write cut short (disk full: the part written is
cut off again) or a killed process left unfinished (the last line of its file, without its newline).
docs/served-log.md has the record and the guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from ranker.serving.producer import ApiProducer, Record

log = logging.getLogger(__name__)

SERVED_DROPPED = Counter(
    "apexrank_api_served_dropped_total",
    "Served records dropped: the spool full (Kafka down too long) or unwritable, or left unfinished by a writer",
)
SERVED_SHIPPED = Counter("apexrank_api_served_shipped_total", "Served records acknowledged by Kafka")
SPOOL_BACKLOG = Gauge("apexrank_api_served_spool_bytes", "Bytes of served records waiting in the spool")

SUFFIX = ".jsonl"
CHECKPOINT = ".ckpt"
#: Lines per publish call.
SHIP_BATCH = 5000
#: Most bytes of one spool file read per pass: a backlog (Kafka was down) ships over several passes
#: instead of being read whole, again, every pass.
READ_BYTES = 8 * 1024 * 1024
#: Longest wait between passes while Kafka keeps failing (the wait doubles from the interval): an API
#: whose Kafka is down does not try to connect twice a second on a thread beside its requests.
MAX_BACKOFF_S = 30.0


def served_record(
    request_id: str,
    kind: str,
    feed: str,
    song_ids: Sequence[str],
    *,
    user_id: str | None = None,
    arm: str | None = None,
    model_version: str | None = None,
    explored: Sequence[bool] | None = None,
    propensity: Sequence[float] | None = None,
    pool: Sequence[str] = (),
    served_at: datetime | None = None,
) -> bytes:
    """One :class:`~ranker.events.FeedServed` as its JSON line: built as a dict and written by orjson,
    not validated here (a few microseconds per response); the feedback consumer validates it."""
    n = len(song_ids)
    record = {
        "schema_version": 1,
        "request_id": request_id,
        "served_at": (served_at or datetime.now(UTC)).isoformat(),
        "kind": kind,
        "feed": feed,
        "user_id": user_id,
        "arm": arm,
        "model_version": model_version,
        "song_ids": list(song_ids),
        "explored": list(explored) if explored is not None else [False] * n,
        "propensity": list(propensity) if propensity is not None else [1.0] * n,
        "pool": list(pool),
    }
    return orjson.dumps(record) + b"\n"


#: The call that writes a record's bytes, kept apart so that tests can cut a write short (a disk that
#: fills mid-record returns fewer bytes than asked for, then fails).
_write_some = os.write


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    """This process's append-only spool file (locked), rotated at ``rotate_bytes``."""

    def __init__(self, directory: Path, max_bytes: int, rotate_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.rotate_bytes = rotate_bytes or max(1 << 16, min(64 << 20, max_bytes // 8))
        self._lock = threading.Lock()
        self._seq = 0
        self._fd = -1
        self.path = self._open()
        self._size = 0
        #: Bytes waiting (all files, as the shipper last measured) plus those written since.
        self._backlog = 0
        self._warned = 0.0
        self.dropped = 0

    def _open(self) -> Path:
        """A new spool file, locked before it gets a name the shippers look at."""
        self._seq += 1
        name = f"served-{os.getpid()}-{time.time_ns()}-{self._seq}{SUFFIX}"
        tmp = self.dir / f".{name}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a file no one else has opened: never blocks
        final = self.dir / name
        os.rename(tmp, final)
        self._fd = fd
        return final

    def write(self, line: bytes) -> bool:
        """Append one record; False (dropped, counted) when the spool is full or unwritable."""
        with self._lock:
            if self._fd < 0:
                return False
            if self._backlog + len(line) > self.max_bytes:
                self._drop("the spool holds api.served_spool_max_bytes (is Kafka down?)")
                return False
            try:
                self._append(line)
            except OSError as exc:
                self._drop(f"spool write failed: {exc}")
                return False
            self._size += len(line)
            self._backlog += len(line)
            if self._size >= self.rotate_bytes:
                self._rotate()
            return True

    def _append(self, line: bytes) -> None:
        """Write all of ``line`` or, raising, none of it: a part left behind would have the next record
        glued onto it, and both would be lost to the reader."""
        done = 0
        try:
            while done < len(line):
                n = _write_some(self._fd, line[done:])
                if n <= 0:
                    raise OSError(f"short write: {done} of {len(line)} bytes")
                done += n
        except OSError:
            if done:
                self._take_back()
            raise

    def _take_back(self) -> None:
        """Cut the file back to its last whole record (the shipper reads only whole lines, so it has not
        read the part); when that fails too, rotate, leaving the part as the last line of a finished
        file, which the shipper drops as it does a killed process's."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            log.warning("could not cut a partly written served record off the spool: %s", exc)
            self._rotate()

    def _drop(self, why: str) -> None:
        self.dropped += 1
        SERVED_DROPPED.inc()
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            log.warning("served record dropped: %s (%d so far)", why, self.dropped)

    def _rotate(self) -> None:
        old = self._fd
        try:
            self.path = self._open()
        except OSError as exc:
            log.warning("could not rotate the served spool: %s", exc)
            return
        self._size = 0
        os.close(old)  # releases its lock: the shipper adopts it like any unowned file

    def measured(self, waiting: int, written_before: int) -> None:
        """The shipper's measure of the bytes waiting, taken when ``written_before`` had been written."""
        with self._lock:
            self._backlog = waiting + (self._backlog - written_before)
            SPOOL_BACKLOG.set(self._backlog)

    @property
    def backlog(self) -> int:
        return self._backlog

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _checkpoint(path: Path) -> int:
    try:
        return int((path.parent / (path.name + CHECKPOINT)).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _set_checkpoint(path: Path, offset: int) -> None:
    ck = path.parent / (path.name + CHECKPOINT)
    tmp = path.parent / f".{ck.name}.tmp"
    tmp.write_text(str(offset))
    os.replace(tmp, ck)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    (path.parent / (path.name + CHECKPOINT)).unlink(missing_ok=True)


Publish = Callable[[str, Sequence[Record]], Sequence[Any]]


class Shipper:
    """Ships the spool directory's files to ``topic``: this process's own, and any no live process owns."""

    def __init__(
        self, spool: Spool, publish: Publish, topic: str, interval_s: float, read_bytes: int = READ_BYTES
    ) -> None:
        self.spool = spool
        self.read_bytes = read_bytes
        self.publish = publish
        self.topic = topic
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self.shipped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="served-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.is_set():
            try:
                self.ship_once()
            except Exception:  # never let the thread die: the next cycle tries again
                log.exception("shipping served records failed")
                self._failed = True
            wait = min(wait * 2.0, max(MAX_BACKOFF_S, self.interval_s)) if self._failed else self.interval_s
            self._stop.wait(wait)

    def ship_once(self) -> int:
        """One pass over the spool directory; how many records the broker acknowledged."""
        before = self.spool._backlog
        own = self.spool.path
        shipped = 0
        waiting = 0
        self._failed = False
        for path in sorted(self.spool.dir.glob(f"*{SUFFIX}")):
            if path == own:
                sent, rest, _ = self._ship_file(path, finished=False)
            else:
                fd = self._adopt(path)
                if fd is None:  # a live process's: its own shipper ships it
                    continue
                try:
                    sent, rest, done = self._ship_file(path, finished=True)
                    if done:
                        _remove(path)
                finally:
                    os.close(fd)
            shipped += sent
            waiting += rest
        self.spool.measured(waiting, before)
        self.shipped += shipped
        SERVED_SHIPPED.inc(shipped)
        return shipped

    @staticmethod
    def _adopt(path: Path) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if _lock(fd):
            return fd
        os.close(fd)
        return None

    def _ship_file(self, path: Path, finished: bool) -> tuple[int, int, bool]:
        """Ship ``path`` from its checkpoint: (records acknowledged, bytes left, whether it is all shipped).
        ``finished``: no process writes it any more (adopted), so a last line without its newline will
        never be completed."""
        start = _checkpoint(path)
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(self.read_bytes)
        except FileNotFoundError:
            return 0, 0, False
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next cycle
        if self._failed:  # Kafka failed on an earlier file this cycle: measure, do not wait on it again
            return 0, max(0, _size(path) - start), False
        shipped = 0
        pos = 0
        while pos < end:
            lines: list[bytes] = []
            cut = pos
            while cut < end and len(lines) < SHIP_BATCH:
                nl = data.index(b"\n", cut)
                lines.append(data[cut:nl])
                cut = nl + 1
            records = [(_key(line), line) for line in lines]
            deliveries = self.publish(self.topic, records)
            advanced = pos
            for line, delivery in zip(lines, deliveries, strict=True):
                if delivery.ok:
                    shipped += 1
                elif delivery.permanent:
                    log.warning("served record refused by Kafka, skipped: %s", delivery.error)
                else:
                    break
                advanced += len(line) + 1
            if advanced > pos:
                _set_checkpoint(path, start + advanced)
            if advanced < cut:
                self._failed = True
                return shipped, max(0, _size(path) - start - advanced), False
            pos = cut
        size = _size(path)
        if finished and end < len(data) and start + len(data) >= size:
            # Its writer was killed inside the write (a write of several pages can stop part way): the
            # record cannot be parsed, and waiting for the rest would keep the file (and backlog) for ever.
            SERVED_DROPPED.inc()
            log.warning(
                "served record its writer left unfinished dropped: %d bytes at the end of %s",
                len(data) - end,
                path.name,
            )
            return shipped, 0, True
        return shipped, max(0, size - start - end), start + end >= size

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after one last pass (what it cannot ship waits in the spool for the next process)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if not self._thread.is_alive() and not self._failed:  # not stuck on, or failing with, Kafka
            with contextlib.suppress(Exception):
                self.ship_once()


def _key(line: bytes) -> bytes | None:
    try:
        rid = orjson.loads(line).get("request_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return rid.encode() if isinstance(rid, str) else None


class ModelVersion:
    """The model version that scored most of the song table's songs (None: no table yet), for the
    served records; counted over the table at most every ``ttl_s`` (a count is a pass over the table)."""

    def __init__(self, table: Callable[[], Any], monotonic: Callable[[], float] = time.monotonic, ttl_s: float = 10.0):
        self._table = table
        self._monotonic = monotonic
        self.ttl_s = ttl_s
        self._version: str | None = None
        self._at = -float("inf")

    def __call__(self) -> str | None:
        now = self._monotonic()
        if now - self._at >= self.ttl_s:
            table = self._table()
            if table is not None:
                models: dict[str, tuple[int, int]] = table.models()
                self._version = max(sorted(models), key=lambda v: models[v][0]) if models else None
                self._at = now
        return self._version


class ServedRecorder:
    """The API's served records: spool + shipper, or nothing (``api.served_log`` off)."""

    def __init__(self, spool: Spool | None, shipper: Shipper | None) -> None:
        self.spool = spool
        self.shipper = shipper

    @classmethod
    def open(
        cls, directory: Path, producer: ApiProducer, topic: str, interval_s: float, max_bytes: int
    ) -> ServedRecorder:
        spool = Spool(directory, max_bytes)
        return cls(spool, Shipper(spool, producer.publish, topic, interval_s))

    @classmethod
    def off(cls) -> ServedRecorder:
        return cls(None, None)

    def record(self, line: bytes) -> bool:
        return self.spool.write(line) if self.spool is not None else False

    def start(self) -> None:
        if self.shipper is not None:
            self.shipper.start()

    def close(self) -> None:
        if self.shipper is not None:
            self.shipper.close()
        if self.spool is not None:
            self.spool.close()
