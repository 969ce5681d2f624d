"""Song catalogs (Parquet or CSV): the batch input of ``publish``, ``embed``, ``train`` and ``eval``.

Required columns: song_id, audio_uri, generator, created_at. Optional: streams,
likes and the five aesthetic columns. Problems are reported with row numbers
(0-based, as in the file) so a user can fix the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, is_valid_song_id

REQUIRED = ("song_id", "audio_uri", "generator", "created_at")


class CatalogError(ValueError):
    """The catalog file cannot be used as it is; the message names the columns or rows."""


@dataclass(frozen=True)
class Catalog:
    table: pa.Table
    path: Path

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def song_ids(self) -> list[str]:
        return [str(x) for x in self.table.column("song_id").to_pylist()]

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.table.column(name).to_numpy(zero_copy_only=False))

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def rows(self) -> list[dict[str, Any]]:
        return list(self.table.to_pylist())


def _describe_rows(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"rows {shown}{more}"


def read_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog; raises :class:`CatalogError` naming the offending rows."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            table = pacsv.read_csv(path, parse_options=opts)
        else:
            raise CatalogError(f"catalog {path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogError(f"catalog {path} cannot be read: {exc}") from exc
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CatalogError(f"catalog {path} lacks required columns: {', '.join(missing)}")
    ids = [str(x) if x is not None else "" for x in table.column("song_id").to_pylist()]
    bad = np.array([i for i, s in enumerate(ids) if not is_valid_song_id(s)], dtype=np.int64)
    if len(bad):
        raise CatalogError(f"catalog {path}: invalid song_id (1-128 of letters, digits, ._:-) at {_describe_rows(bad)}")
    seen: dict[str, int] = {}
    dups = []
    for i, s in enumerate(ids):
        if s in seen:
            dups.append(i)
        seen[s] = i
    if dups:
        raise CatalogError(f"catalog {path}: duplicate song_id at {_describe_rows(np.array(dups))}")
    for col in POPULARITY_TASKS + AESTHETIC_TASKS:
        if col not in table.column_names:
            continue
        values = pc.cast(table.column(col), pa.float64()).to_numpy(zero_copy_only=False)
        if col in POPULARITY_TASKS:
            nan = np.flatnonzero(np.isnan(values))
            if len(nan):
                raise CatalogError(f"catalog {path}: column {col} has NaN or missing counts at {_describe_rows(nan)}")
            neg = np.flatnonzero(values < 0)
            if len(neg):
                raise CatalogError(f"catalog {path}: column {col} has negative counts at {_describe_rows(neg)}")
        else:
            out = np.flatnonzero(~np.isnan(values) & ((values < 1) | (values > 5)))
            if len(out):
                raise CatalogError(f"catalog {path}: column {col} must be on the 1-5 scale at {_describe_rows(out)}")
    return Catalog(table=table, path=path)
