"""The stored pieces of a target transform, and the checks on the columns it reads.

:class:`~ranker.model.targets.TargetTransform` keeps, per task and reference group, a
distribution of counts (``_Table``, see the saved parameters in :mod:`ranker.model.targets`)
and, for the prior like rate, a like-rate curve (``_RateCurve``, an isotonic fit). These, the
cohort keys (ISO weeks) and the validation of input columns and counts live here so that the
transform's own module reads as the transform: fitting, scoring, inverting and (de)serialising.
Like the transform, this module needs numpy only: serving imports it, and never torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_MAX_ROWS_NAMED = 10


def iso_week(value: Any) -> str:
    """The ISO week (UTC) of a creation time, e.g. ``2026-W07``.

    Accepts datetimes (naive ones are taken as UTC), dates, ISO 8601 strings and numpy
    datetime64 values.
    """
    when: date
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            raise ValueError("created_at is missing (NaT)")
        when = value.astype("datetime64[D]").astype(object)
    elif isinstance(value, datetime):
        when = value.astimezone(UTC).date() if value.tzinfo is not None else value.date()
    elif isinstance(value, date):
        when = value
    elif isinstance(value, str):
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        when = parsed.astimezone(UTC).date() if parsed.tzinfo is not None else parsed.date()
    else:
        raise ValueError(f"created_at {value!r} is not a date, datetime, ISO string or datetime64")
    year, week, _ = when.isocalendar()
    return f"{year}-W{week:02d}"


def cohort_key(generator: str, created_at: Any) -> str:
    """The reference group of a song: ``<generator>|<ISO week>``."""
    return f"{generator}|{iso_week(created_at)}"


@dataclass(frozen=True)
class _Table:
    """A reference distribution: distinct counts ``x`` and their mid-rank percentiles."""

    x: FloatArray
    pct: FloatArray
    n: int

    @classmethod
    def fit(cls, counts: FloatArray, max_knots: int) -> _Table:
        x, c = np.unique(counts, return_counts=True)
        n = int(c.sum())
        cum = np.cumsum(c)
        pct = 100.0 * (cum - 0.5 * c) / n  # mid-rank: half of the ties count as below
        if len(x) > max_knots:
            keep = np.unique(np.searchsorted(pct, np.linspace(pct[0], pct[-1], max_knots)))
            keep = np.unique(np.concatenate([[0], keep[keep < len(x)], [len(x) - 1]]))
            x, pct = x[keep], pct[keep]
        return cls(x=x.astype(np.float64), pct=pct.astype(np.float64), n=n)

    def percentile(self, counts: FloatArray) -> FloatArray:
        if len(self.x) == 1:
            return np.full(counts.shape, self.pct[0])
        return np.interp(np.log1p(counts), np.log1p(self.x), self.pct)

    def count_at(self, pct: FloatArray) -> FloatArray:
        if len(self.x) == 1:
            return np.full(pct.shape, self.x[0])
        return np.expm1(np.interp(pct, self.pct, np.log1p(self.x)))

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "x": self.x.tolist(), "pct": self.pct.tolist()}

    @classmethod
    def from_dict(cls, where: str, data: Mapping[str, Any]) -> _Table:
        try:
            x = np.asarray(data["x"], dtype=np.float64)
            pct = np.asarray(data["pct"], dtype=np.float64)
            n = int(data["n"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"target transform table {where} is malformed: {exc!r}") from exc
        if x.ndim != 1 or x.shape != pct.shape or len(x) == 0 or n < len(x):
            raise ValueError(f"target transform table {where} has inconsistent sizes")
        if not (np.isfinite(x).all() and np.isfinite(pct).all()) or x[0] < 0:
            raise ValueError(f"target transform table {where} has non-finite or negative values")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(pct) <= 0) or pct[0] < 0 or pct[-1] > 100:
            raise ValueError(f"target transform table {where} is not strictly increasing within 0-100")
        return cls(x=x, pct=pct, n=n)


@dataclass(frozen=True)
class _RateCurve:
    """Like rate as an increasing, piecewise-linear function of the likes score (0-100)."""

    x: FloatArray  # likes scores, strictly increasing
    y: FloatArray  # like rates in [0, 1], non-decreasing

    @classmethod
    def fit(cls, scores: FloatArray, likes: FloatArray, streams: FloatArray, max_knots: int) -> _RateCurve | None:
        ok = np.isfinite(scores) & np.isfinite(likes) & np.isfinite(streams) & (streams >= 1)
        if ok.sum() < 2:
            return None
        order = np.argsort(scores[ok], kind="stable")
        x, w = scores[ok][order], streams[ok][order]
        rate = np.clip(likes[ok][order] / w, 0.0, 1.0)
        blocks = _isotonic(x, rate, w)
        if len(blocks) > max_knots:
            keep = np.unique(np.linspace(0, len(blocks) - 1, max_knots).round().astype(np.int64))
            blocks = [blocks[i] for i in keep]
        bx = np.array([b[0] for b in blocks])
        by = np.array([b[1] for b in blocks])
        return cls(x=bx, y=np.maximum.accumulate(by))

    def rate(self, score: FloatArray) -> FloatArray:
        if len(self.x) == 1:
            return np.full(score.shape, self.y[0])
        return np.asarray(np.interp(score, self.x, self.y), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _RateCurve:
        try:
            x = np.asarray(data["x"], dtype=np.float64)
            y = np.asarray(data["y"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"target transform like-rate curve is malformed: {exc!r}") from exc
        if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
            raise ValueError("target transform like-rate curve has inconsistent sizes")
        if not (np.isfinite(x).all() and np.isfinite(y).all()) or np.any(np.diff(x) <= 0):
            raise ValueError("target transform like-rate curve must be finite with increasing scores")
        if np.any(np.diff(y) < 0) or y[0] < 0 or y[-1] > 1:
            raise ValueError("target transform like-rate curve must be non-decreasing within 0-1")
        return cls(x=x, y=y)


def _isotonic(x: FloatArray, y: FloatArray, w: FloatArray) -> list[tuple[float, float]]:
    """Weighted pool-adjacent-violators: (x, fitted y) per block of the increasing fit of y on x.

    Points with equal ``x`` are pooled first (their weighted mean), so the knots' x are strictly
    increasing and a tie group is merged as a whole, never point by point. A block's x is the
    weighted mean of its points' x.
    """
    xs, inverse = np.unique(x, return_inverse=True)
    wsum = np.bincount(inverse, weights=w)
    ysum = np.bincount(inverse, weights=w * y)
    keep = wsum > 0
    stack: list[list[float]] = []  # [sum w*x, sum w*y, sum w]
    for xi, yw, wi in zip(xs[keep].tolist(), ysum[keep].tolist(), wsum[keep].tolist(), strict=True):
        cur = [wi * xi, yw, wi]
        while stack and stack[-1][1] / stack[-1][2] >= cur[1] / cur[2]:
            top = stack.pop()
            cur = [top[0] + cur[0], top[1] + cur[1], top[2] + cur[2]]
        stack.append(cur)
    return [(b[0] / b[2], b[1] / b[2]) for b in stack]


def _column(data: Any, name: str) -> npt.NDArray[Any]:
    """A column of a mapping, pandas DataFrame or pyarrow Table, as a 1-D numpy array."""
    try:
        col = data[name]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"the data has no column {name!r}") from exc
    if hasattr(col, "to_numpy") and not isinstance(col, np.ndarray):
        try:
            col = col.to_numpy(zero_copy_only=False)  # pyarrow
        except TypeError:
            col = col.to_numpy()  # pandas
    arr = np.asarray(col)
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be one-dimensional, got shape {arr.shape}")
    return arr


def _rows(mask: npt.NDArray[np.bool_]) -> str:
    rows = np.flatnonzero(mask)
    more = f" and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    return f"rows {rows[:_MAX_ROWS_NAMED].tolist()}{more}"


def _counts(name: str, values: npt.ArrayLike, *, allow_missing: bool) -> FloatArray:
    """Validated counts: float64, finite and >= 0 (NaN only when allowed)."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} counts must be numbers: {exc}") from exc
    arr = np.atleast_1d(arr)
    nan = np.isnan(arr)
    if nan.any() and not allow_missing:
        raise ValueError(f"{name} counts are missing (NaN) at {_rows(nan)}")
    bad = ~nan & ~(np.isfinite(arr) & (arr >= 0))
    if bad.any():
        raise ValueError(f"{name} counts are negative or infinite at {_rows(bad)}")
    return arr


def _broadcast(values: Any, n: int, name: str) -> list[Any]:
    if isinstance(values, str | bytes | datetime | date | np.datetime64) or not isinstance(values, Iterable):
        return [values] * n
    items = list(values)
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} values for {n} counts")
    return items


def _weeks(values: Sequence[Any]) -> list[str]:
    weeks: list[str] = []
    bad: list[int] = []
    for i, v in enumerate(values):
        try:
            weeks.append(iso_week(v))
        except (ValueError, TypeError, OverflowError):
            bad.append(i)
            weeks.append("")
    if bad:
        more = f" and {len(bad) - _MAX_ROWS_NAMED} more" if len(bad) > _MAX_ROWS_NAMED else ""
        raise ValueError(f"created_at is missing or not a date at rows {bad[:_MAX_ROWS_NAMED]}{more}")
    return weeks
