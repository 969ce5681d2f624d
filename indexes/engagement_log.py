"""The durable engagement log: Parquet files partitioned by day, for retraining.

The offset-named log itself (:class:`OffsetLog`) takes its schema and the column whose latest
time names a file's day: the served log (:mod:`indexes.served_log`) is the same log over
``feeds.served``.

Exactly-once without a transaction: every file covers a contiguous offset range
of one topic partition and is named for it
(``day=YYYY-MM-DD/<topic>-p<partition>-o<first>-<last>.parquet``, the day of its
latest event, so a file may hold events of earlier days: filter on ``ts``; files
written before this rule are named for their earliest event), written to a
temporary name, fsynced and renamed (a temporary a crash mid-write left is removed by a
later write or prune once it is an hour old). On start (and after a rebalance) the writer
reads the highest logged offset per partition from the file names and skips
messages at or below it, so a replayed batch is never logged twice. The
directory must be shared by all members of the consumer group (a volume or a
mounted bucket) so that a partition moving between members keeps its history.

Retention (``retention.engagement_log_days``): :meth:`OffsetLog.prune` deletes the files of
days before a cut-off (files whose every row is older), except each partition's newest file, whose
name carries the logged offset that keeps a replayed batch from being logged twice.

Offsets that start again (a broker that came back empty, a topic deleted and made again) would
make the writer skip every new record up to the old logged offset. The consumer sees it, by the
topic's new id (:meth:`OffsetLog.follow_topic`) or by a partition's high watermark at or below the
logged offset (which a replay never shows), and calls :meth:`OffsetLog.restart`: the partition's
files become an earlier generation, read like the others but no longer counted as logged.

One race is left to the reader: a member that lost a partition in a rebalance
but is still finishing its batch (its commit will be refused) can write an
offset range the new owner also writes. :meth:`OffsetLog.read` therefore
keeps one row per (partition, offset): each message is one event.
"""

from __future__ import annotations

import errno
import logging
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

from indexes.durable import fsync_dir, replace_text, stale

log = logging.getLogger(__name__)

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
#: A live file's name, or an earlier generation's (``.g<n>``: set aside by :meth:`OffsetLog.restart`).
_NAME = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-o(?P<first>\d+)-(?P<last>\d+)(?:\.g(?P<gen>\d+))?\.parquet$")
#: A file being written: ``.<final name>.tmp`` beside it.
_TMP = ".tmp"
#: The live files' generation when rows are read: after every earlier one.
_LIVE = 2**62
#: Listings a read makes while files go between its listing and their read (a member's prune or restart).
_READ_ATTEMPTS = 3


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
        #: The topic id this instance last followed: another member may set the files aside for it.
        self._topic_id: str | None = None
        self._next_prune = -float("inf")
        self._next_sweep = -float("inf")
        self.refresh()

    def refresh(self) -> None:
        """Re-read the highest logged offset per partition from the (live) files on disk."""
        logged: dict[int, int] = {}
        for path in self._files():
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic and m["gen"] is None:
                p, last = int(m["partition"]), int(m["last"])
                logged[p] = max(logged.get(p, -1), last)
        self._logged = logged

    def logged_through(self, partition: int) -> int:
        """Highest offset already in the log for ``partition`` (-1 when none)."""
        return self._logged.get(partition, -1)

    def follow_topic(self, topic_id: str) -> int:
        """Record the broker's id of the topic (new each time the topic is created). When it differs from
        the one recorded, the topic was made again and its offsets start at 0: every partition's files
        become an earlier generation (:meth:`restart`). Read from disk each time, so the members of a
        group sharing the directory set the files aside once; a member that finds the new id already
        recorded re-reads its logged offsets, or it would skip the new records up to the old ones.
        How many files were set aside."""
        path = self.dir / f".{self.topic}.topic-id"
        known = path.read_text().strip() if path.exists() else None
        moved = 0
        if known == topic_id:
            if self._topic_id != topic_id:  # this instance's offsets may predate another member's restart
                self.refresh()
        else:
            if known is not None:
                for partition in sorted(self.live_partitions()):
                    moved += self.restart(partition)
            replace_text(path, topic_id + "\n")
        self._topic_id = topic_id
        return moved

    def _day_folders(self) -> list[Path]:
        return [folder for folder in self.dir.glob("day=*") if folder.is_dir()]

    def _files(self, pattern: str = "*.parquet") -> list[Path]:
        """The day folders' files matching ``pattern``, as listed now. A folder that another member's
        prune removes while this lists is skipped: ``Path.glob("day=*/...")`` raises on it (Python 3.11)."""
        out: list[Path] = []
        for folder in self._day_folders():
            try:
                out.extend(folder.glob(pattern))
            except FileNotFoundError:
                continue
        return out

    def live_partitions(self) -> set[int]:
        """The partitions with live files on disk."""
        out: set[int] = set()
        for path in self._files():
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic and m["gen"] is None:
                out.add(int(m["partition"]))
        return out

    def restart(self, partition: int) -> int:
        """The topic's offsets of ``partition`` started again (a broker that came back empty, a topic
        deleted and made again): its live files become an earlier generation (``.g<n>`` in the name),
        still read, so the new records, at offsets the log has seen, are logged instead of skipped.
        How many files were set aside."""
        files: list[Path] = []
        gens = [0]
        for path in self._files():
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic:
                if m["gen"] is not None:
                    gens.append(int(m["gen"]))
                elif int(m["partition"]) == partition:
                    files.append(path)
        gen = max(gens) + 1
        moved: list[Path] = []
        for path in files:
            try:
                os.replace(path, path.with_name(f"{path.stem}.g{gen}.parquet"))
            except FileNotFoundError:  # another member's restart or prune took it first
                continue
            moved.append(path)
        for folder in {path.parent for path in moved}:
            fsync_dir(folder)
        self._logged.pop(partition, None)
        return len(moved)

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
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.PRUNE_EVERY_S
            self._sweep_leftovers()
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
        tmp = folder / f".{final.name}{_TMP}"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:  # a failed write's half file: no later write takes its name
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(folder)

    #: A temporary file older than this is what a write cut short left (a write takes seconds); a
    #: younger one may be another member's write in progress.
    LEFTOVER_AFTER_S = 3600.0

    def _sweep_leftovers(self) -> None:
        """Delete this topic's temporary files that a crash mid-write left: the replayed batch usually
        covers another offset range, so no later write takes their name, and one would keep its day
        folder from going. The members of a group share the folders and the topic, so only the age
        tells a leftover from another member's write in progress."""
        mine = (
            p
            for p in self._files(f".*{_TMP}")
            if (m := _NAME.match(p.name[1 : -len(_TMP)])) and m["topic"] == self.topic
        )
        for left in stale(mine, self.LEFTOVER_AFTER_S):
            left.unlink(missing_ok=True)  # another member's sweep may take it first

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
        live file (it records the logged offset), and the temporaries crashed writes left; those days'
        folders go too once empty. Every member of the group prunes the shared directory, so a file or
        folder another member deleted first, or a folder one of them just wrote to, is no error. How
        many (log) files were deleted."""
        self._sweep_leftovers()
        cutoff = before.astimezone(UTC).date().isoformat()
        newest: dict[int, tuple[int, Path]] = {}
        files: list[tuple[str, int, Path]] = []
        folders = [f for f in self._day_folders() if f.name.removeprefix("day=") < cutoff]
        for path in self._files():
            m = _NAME.match(path.name)
            if m and m["topic"] == self.topic:
                partition, last = int(m["partition"]), int(m["last"])
                files.append((path.parent.name.removeprefix("day="), partition, path))
                if m["gen"] is None and (partition not in newest or newest[partition][0] < last):
                    newest[partition] = (last, path)
        keep = {path for _, path in newest.values()}
        removed = 0
        for day, _, path in files:
            if day < cutoff and path not in keep:
                try:
                    path.unlink()
                except FileNotFoundError:  # another member's prune took it first
                    continue
                removed += 1
        # Only the days pruned: a newer folder may be a writer's, made a moment before its first file.
        for folder in folders:
            try:
                folder.rmdir()
            except OSError as exc:  # not empty (a kept file, another member's write), or already gone
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
        return removed

    def _read_listed(self, wanted: set[str] | None) -> tuple[list[pa.Table], int]:
        """The listed files' tables (with their generation), and how many files went between the
        listing and their read."""
        tables, vanished = [], 0
        for path in sorted(self._files()):
            day = path.parent.name.removeprefix("day=")
            if wanted is not None and day not in wanted:
                continue
            if m := _NAME.match(path.name):
                try:
                    table = pq.read_table(path, schema=self.schema)
                except FileNotFoundError:
                    if path.exists():  # not this file's absence: a real fault
                        raise
                    vanished += 1
                    continue
                gen = _LIVE if m["gen"] is None else int(m["gen"])
                tables.append(table.append_column("_gen", pa.array(np.full(len(table), gen), pa.int64())))
        return tables, vanished

    def read(self, days: Iterable[str] | None = None) -> pa.Table:
        """Every logged row (optionally only some days), each once: earlier generations first, then in
        (partition, offset) order."""
        wanted = set(days) if days is not None else None
        for attempt in range(_READ_ATTEMPTS):
            tables, vanished = self._read_listed(wanted)
            if not vanished:
                break
            # Another member moved files since the listing: pruned (gone for good), or set aside as an
            # earlier generation after a topic restart (same rows, new name): list again to find those.
            log.info("%d log files went while being read; reading again (%d)", vanished, attempt + 1)
        if not tables:
            return self.schema.empty_table()
        keys = ("_gen", "partition", "offset")
        table = pa.concat_tables(tables).sort_by([(k, "ascending") for k in keys])
        cols = [table.column(k).to_numpy() for k in keys]
        first = np.ones(table.num_rows, dtype=bool)  # sorted, so a repeated (generation, partition, offset) is adjacent
        first[1:] = np.logical_or.reduce([c[1:] != c[:-1] for c in cols])
        table = table.drop_columns(["_gen"])
        return table if first.all() else table.filter(pa.array(first))


class EngagementLog(OffsetLog):
    """The ``engagement`` topic's log: one row per event (:data:`SCHEMA`), days by ``ts``."""

    def __init__(self, directory: Path, topic: str) -> None:
        super().__init__(directory, topic, SCHEMA, "ts")

    def append(self, events: Sequence[LoggedEvent]) -> int:
        """Log ``events`` not yet logged (offset above the partition's logged offset); returns the count."""
        return self.append_columns({f.name: [getattr(e, f.name) for e in events] for f in fields(LoggedEvent)})
