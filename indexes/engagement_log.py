"""The durable engagement log: Parquet files partitioned by day, for retraining.

Exactly-once without a transaction: every file covers a contiguous offset range
of one topic partition and is named for it
(``day=YYYY-MM-DD/<topic>-p<partition>-o<first>-<last>.parquet``, the day of its
earliest event, so a file written around midnight may hold a few events of the
next day: filter on ``ts``), written to a
temporary name, fsynced and renamed. On start (and after a rebalance) the writer
reads the highest logged offset per partition from the file names and skips
messages at or below it, so a replayed batch is never logged twice. The
directory must be shared by all members of the consumer group (a volume or a
mounted bucket) so that a partition moving between members keeps its history.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
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


class EngagementLog:
    """Append-only, offset-named Parquet files; see the module docstring for the guarantees."""

    def __init__(self, directory: Path, topic: str) -> None:
        self.dir = Path(directory)
        self.topic = topic
        self.dir.mkdir(parents=True, exist_ok=True)
        self._logged: dict[int, int] = {}
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

    def append(self, events: Sequence[LoggedEvent]) -> int:
        """Log ``events`` not yet logged (offset above the partition's logged offset); returns the count.

        One file per partition per call, in the day folder of its earliest event: a single file
        per offset range keeps the logged offset free of holes after a crash between files.
        """
        groups: dict[int, list[LoggedEvent]] = defaultdict(list)
        for e in events:
            if e.offset > self.logged_through(e.partition):
                groups[e.partition].append(e)
        for partition, rows in sorted(groups.items()):
            rows.sort(key=lambda e: e.offset)
            day = min(e.ts for e in rows).date().isoformat()
            self._write(day, partition, rows[0].offset, rows[-1].offset, rows)
            self._logged[partition] = rows[-1].offset
        return sum(len(rows) for rows in groups.values())

    def _write(self, day: str, partition: int, first: int, last: int, rows: Sequence[LoggedEvent]) -> None:
        folder = self.dir / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{self.topic}-p{partition}-o{first}-{last}.parquet"
        tmp = folder / f".{final.name}.tmp"
        table = pa.Table.from_pylist([e.__dict__ for e in rows], schema=SCHEMA)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, days: Iterable[str] | None = None) -> pa.Table:
        """Every logged event (optionally only some days), in (partition, offset) order."""
        wanted = set(days) if days is not None else None
        tables = []
        for path in sorted(self.dir.glob("day=*/*.parquet")):
            day = path.parent.name.removeprefix("day=")
            if wanted is not None and day not in wanted:
                continue
            if _NAME.match(path.name):
                tables.append(pq.read_table(path, schema=SCHEMA))
        if not tables:
            return SCHEMA.empty_table()
        return pa.concat_tables(tables).sort_by([("partition", "ascending"), ("offset", "ascending")])
