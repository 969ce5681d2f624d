"""The served log: ``feeds.served`` as Parquet beside the engagement log, and the impressions join.

One row per served record (:class:`ranker.events.FeedServed`, its lists kept as lists), in files
named for their topic, partition and offset range, exactly as the engagement log's
(:class:`indexes.engagement_log.OffsetLog`: exactly once by offsets, days by ``served_at``).
The API ships records at least once, so a request_id can be in the log twice (two offsets):
:func:`impressions` keeps each request_id once. docs/served-log.md has the join's columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexes.engagement_log import OffsetLog

SERVED_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("served_at", pa.timestamp("us", tz="UTC")),
        ("kind", pa.string()),
        ("feed", pa.string()),
        ("user_id", pa.string()),
        ("arm", pa.string()),
        ("model_version", pa.string()),
        ("song_ids", pa.list_(pa.string())),
        ("explored", pa.list_(pa.bool_())),
        ("propensity", pa.list_(pa.float64())),
        ("pool", pa.list_(pa.string())),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)

#: The record's own columns, repeated on each of its items' rows.
_RECORD_COLUMNS = ("request_id", "served_at", "kind", "feed", "user_id", "arm", "model_version")

IMPRESSIONS_SCHEMA = pa.schema(
    [SERVED_SCHEMA.field(name) for name in _RECORD_COLUMNS]
    + [
        ("song_id", pa.string()),
        ("position", pa.int32()),
        ("explored", pa.bool_()),
        ("propensity", pa.float64()),
        ("pool", pa.list_(pa.string())),
        ("plays", pa.int32()),
        ("likes", pa.int32()),
        ("skips", pa.int32()),
    ]
)


class ServedLog(OffsetLog):
    """The ``feeds.served`` topic's log: one row per served record (:data:`SERVED_SCHEMA`)."""

    def __init__(self, directory: Path, topic: str) -> None:
        super().__init__(directory, topic, SERVED_SCHEMA, "served_at")

    def read(self, days: Iterable[str] | int | None = None) -> pa.Table:
        """Every logged record, each offset once; ``days``: the day folders to read (names
        ``YYYY-MM-DD``), or how many of the newest."""
        if isinstance(days, int):
            folders = sorted(p.name.removeprefix("day=") for p in self.dir.glob("day=*") if p.is_dir())
            days = folders[-days:] if days > 0 else []
        return super().read(days)


def _first_each(keys: pa.Array) -> np.ndarray:
    """Row numbers of each key's first occurrence, in row order."""
    _, first = np.unique(np.asarray(keys.to_pylist(), dtype=object), return_index=True)
    return np.sort(first)


def impressions(served: pa.Table, engagement: pa.Table) -> pa.Table:
    """One row per served item (:data:`IMPRESSIONS_SCHEMA`): the served records, each request_id
    once, with the engagement events (each event_id once) of that request_id and song counted:
    plays ("play"), likes ("like" minus "unlike", floored at 0), skips ("skip")."""
    if served.num_rows:
        served = served.take(pa.array(_first_each(served.column("request_id").combine_chunks())))
    ids = served.column("song_ids").combine_chunks()
    parent = pc.list_parent_indices(ids)
    lengths = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    par = parent.to_numpy(zero_copy_only=False)
    position = np.arange(len(par)) - starts[par] if len(par) else np.zeros(0, np.int64)
    explored = pc.list_flatten(served.column("explored").combine_chunks())
    pool = served.column("pool").combine_chunks().take(parent)
    pool = pc.if_else(explored, pool, pa.nulls(len(pool), pool.type))
    columns: dict[str, pa.Array] = {name: served.column(name).combine_chunks().take(parent) for name in _RECORD_COLUMNS}
    columns["song_id"] = pc.list_flatten(ids)
    columns["position"] = pa.array(position, pa.int32())
    columns["explored"] = explored
    columns["propensity"] = pc.list_flatten(served.column("propensity").combine_chunks())
    columns["pool"] = pool
    shown = pa.table(columns)

    events = engagement
    if events.num_rows:
        events = events.take(pa.array(_first_each(events.column("event_id").combine_chunks())))
    events = events.filter(pc.is_valid(events.column("request_id")))
    kind = events.column("type")
    counts = (
        pa.table(
            {
                "request_id": events.column("request_id"),
                "song_id": events.column("song_id"),
                "play": pc.cast(pc.equal(kind, "play"), pa.int32()),
                "like": pc.cast(pc.equal(kind, "like"), pa.int32()),
                "unlike": pc.cast(pc.equal(kind, "unlike"), pa.int32()),
                "skip": pc.cast(pc.equal(kind, "skip"), pa.int32()),
            }
        )
        .group_by(["request_id", "song_id"])
        .aggregate([(c, "sum") for c in ("play", "like", "unlike", "skip")])
    )
    # Join the keys only (a join carries no list column), then put the counts back in row order.
    keys = pa.table(
        {
            "request_id": columns["request_id"],
            "song_id": columns["song_id"],
            "row": pa.array(np.arange(shown.num_rows), pa.int64()),
        }
    )
    joined = keys.join(counts, ["request_id", "song_id"], join_type="left outer").sort_by("row")

    def total(name: str) -> np.ndarray:
        return pc.fill_null(joined.column(f"{name}_sum"), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    out = {name: shown.column(name) for name in IMPRESSIONS_SCHEMA.names[:12]}
    out["plays"] = pa.array(total("play"), pa.int32())
    out["likes"] = pa.array(np.maximum(total("like") - total("unlike"), 0), pa.int32())
    out["skips"] = pa.array(total("skip"), pa.int32())
    return pa.Table.from_pydict(out, schema=IMPRESSIONS_SCHEMA)
