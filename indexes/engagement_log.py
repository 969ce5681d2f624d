"""The durable engagement log: Parquet files partitioned by day, for retraining.

The offset-named log itself (:class:`OffsetLog`) takes its schema and the column whose latest
time names a file's day: the served log (:mod:`indexes.served_log`) is the same log over
``feeds.served``.

Exactly-once without a transaction: every file covers a contiguous offset range
of one topic partition and is named for it
(``day=YYYY-MM-DD/<topic>-p<partition>-o<first>-<last>.parquet``, the day of its
latest event, so a file may hold events of earlier days: filter on ``ts``; files
written before this rule are named for their earliest event), written to a
temporary name, fsynced and renamed. On start (and after a rebalance) the writer
reads the highest logged offset per partition from the file names and skips
messages at or below it, so a replayed batch is never logged twice. The
directory must be shared by all members of the consumer group (a volume or a
mounted bucket) so that a partition moving between members keeps its history.

Retention (``retention.engagement_log_days``): :meth:`OffsetLog.prune` deletes the files of
days before a cut-off (files whose every row is older), except each partition's newest file, whose
name carries the logged offset that keeps a replayed batch from being logged twice.

One race is left to the reader: a member that lost a partition in a rebalance
but is still finishing its batch (its commit will be refused) can write an
offset range the new owner also writes. :meth:`OffsetLog.read` therefore
keeps one row per (partition, offset): each message is one event.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("song_id", pa.string()),
        ("user_id", pa.string()),
        ("type", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("feed", pa.string()),
        ("position", pa.int32()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        # Added with issue 16: files written before it read back with nulls here.
        ("request_id", pa.string()),
    ]
)
_NAME = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-o(?P<first>\d+)-(?P<last>\d+)\.parquet$")


@dataclass(frozen=True)
class LoggedEvent:
    event_id: str
    song_id: str
    user_id: str
    type: str
    ts: datetime
    feed: str | None
    position: int | None
    partition: int
    offset: int
    request_id: str | None = None


class OffsetLog:
    """Append-only, offset-named Parquet files of ``schema`` (which has ``partition`` and ``offset``
    columns, and ``time_column``, the one that names a file's day); see the module docstring for the
    guarantees."""

    def __init__(self, directory: Path, topic: str, schema: pa.Schema, time_column: str) -> None:
        self.dir = Path(directory)
        self.topic = topic
        self.schema = schema
        self.time_column = time_column
        self.dir.mkdir(parents=True, exist_ok=True)
        self._logged: dict[int, int] = {}
        self._next_prune = -float("inf")
        self.refresh()

    def refresh(self) -> None:
        """Re-read the highest logged offset per partition from the files on disk."""
        logged: dict[int, int] = {}
        for path in self.dir.glob("day=*/*.parquet"):
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic:
                p, last = int(m["partition"]), int(m["last"])
                logged[p] = max(logged.get(p, -1), last)
        self._logged = logged

    def logged_through(self, partition: int) -> int:
        """Highest offset already in the log for ``partition`` (-1 when none)."""
        return self._logged.get(partition, -1)

    def append_columns(self, columns: Mapping[str, Sequence[Any]]) -> int:
        """Log the rows not yet logged (offset above the partition's logged offset), given as columns:
        one equal-length sequence per schema field (times as aware datetimes, converted to UTC; a field
        left out is nulls). Returns how many rows were logged.

        One file per partition per call, in the day folder of its latest event: a single file per
        offset range keeps the logged offset free of holes after a crash between files, and a file
        goes (:meth:`prune`) only once its newest row is past the retention, so one event with an
        old ``ts`` (a device's clock, a late upload) cannot take the rest of its batch with it.
        """
        partitions = np.asarray(columns["partition"], dtype=np.int64)
        offsets = np.asarray(columns["offset"], dtype=np.int64)
        if not len(offsets):
            return 0
        todo: list[tuple[int, np.ndarray]] = []
        for partition in np.unique(partitions).tolist():
            idx = np.flatnonzero((partitions == partition) & (offsets > self.logged_through(partition)))
            if len(idx):
                todo.append((partition, idx[np.argsort(offsets[idx], kind="stable")]))
        if not todo:
            return 0
        arrays = [
            pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(len(offsets), f.type)
            for f in self.schema
        ]
        table = pa.table(arrays, schema=self.schema)
        for partition, idx in todo:
            rows = table.take(pa.array(idx))
            first, last = int(offsets[idx[0]]), int(offsets[idx[-1]])
            latest = pc.max(rows.column(self.time_column)).as_py()
            self._write(latest.date().isoformat(), partition, first, last, rows)
            self._logged[partition] = last
        return sum(len(idx) for _, idx in todo)

    def _write(self, day: str, partition: int, first: int, last: int, table: pa.Table) -> None:
        folder = self.dir / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{self.topic}-p{partition}-o{first}-{last}.parquet"
        tmp = folder / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    #: How often :meth:`maybe_prune` looks at the files (a glob of the whole log).
    PRUNE_EVERY_S = 3600.0

    def maybe_prune(self, keep_days: float | None, now: datetime | None = None) -> int:
        """:meth:`prune` the days older than ``keep_days`` (None: keep all), at most every
        :data:`PRUNE_EVERY_S` seconds; how many files went."""
        clock = time.monotonic()
        if keep_days is None or clock < self._next_prune:
            return 0
        self._next_prune = clock + self.PRUNE_EVERY_S
        return self.prune((now or datetime.now(UTC)) - timedelta(days=keep_days))

    def prune(self, before: datetime) -> int:
        """Delete this topic's files of days before ``before``'s (UTC) day, but never a partition's newest
        file (it records the logged offset); empty day folders go too. How many files were deleted."""
        cutoff = before.astimezone(UTC).date().isoformat()
        newest: dict[int, tuple[int, Path]] = {}
        files: list[tuple[str, int, Path]] = []
        for path in self.dir.glob("day=*/*.parquet"):
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic:
                partition, last = int(m["partition"]), int(m["last"])
                files.append((path.parent.name.removeprefix("day="), partition, path))
                if partition not in newest or newest[partition][0] < last:
                    newest[partition] = (last, path)
        keep = {path for _, path in newest.values()}
        removed = 0
        for day, _, path in files:
            if day < cutoff and path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        for folder in self.dir.glob("day=*"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def read(self, days: Iterable[str] | None = None) -> pa.Table:
        """Every logged row (optionally only some days), in (partition, offset) order, each once."""
        wanted = set(days) if days is not None else None
        tables = []
        for path in sorted(self.dir.glob("day=*/*.parquet")):
            day = path.parent.name.removeprefix("day=")
            if wanted is not None and day not in wanted:
                continue
            if _NAME.match(path.name):
                tables.append(pq.read_table(path, schema=self.schema))
        if not tables:
            return self.schema.empty_table()
        table = pa.concat_tables(tables).sort_by([("partition", "ascending"), ("offset", "ascending")])
        part = table.column("partition").to_numpy()
        off = table.column("offset").to_numpy()
        first = np.ones(len(off), dtype=bool)  # sorted, so a repeated (partition, offset) is adjacent
        first[1:] = (part[1:] != part[:-1]) | (off[1:] != off[:-1])
        return table if first.all() else table.filter(pa.array(first))


class EngagementLog(OffsetLog):
    """The ``engagement`` topic's log: one row per event (:data:`SCHEMA`), days by ``ts``."""

    def __init__(self, directory: Path, topic: str) -> None:
        super().__init__(directory, topic, SCHEMA, "ts")

    def append(self, events: Sequence[LoggedEvent]) -> int:
        """Log ``events`` not yet logged (offset above the partition's logged offset); returns the count."""
        return self.append_columns({f.name: [getattr(e, f.name) for e in events] for f in fields(LoggedEvent)})
