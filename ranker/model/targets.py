"""Popularity targets: raw engagement counts -> 0-100 scores the head learns, and back.

A raw count (streams, likes) becomes its mid-rank percentile within a reference population,
then ``score = 100 * (pct / 100) ** gamma``:

- Percentiles first, because raw counts are heavy-tailed and their scale drifts with platform
  and time; a rank within comparable songs does not.
- The reference population is either all songs or, with ``cohort="generator_week"``, songs of
  the same generator created in the same ISO week (UTC): songs on different platforms get
  different exposure, and older songs have had longer to collect plays. A cohort smaller than
  ``min_cohort_size`` falls back to its generator, then to all songs.
- ``gamma < 1`` compresses the top tail. The default, ``gamma = 0.5`` (a square root), maps the
  top decile (percentiles 90-100) onto 94.9-100 and the bottom decile onto 0-31.6. Which
  top-decile song takes off is decided mostly by exposure and luck the audio cannot show, while
  whether a song is ignored is much more audible (broken mixes, incoherent structure). With MSE
  training, the weight an error gets is proportional to the slope of the transform squared, so
  gamma = 0.5 makes the head spend about 4x less effort per percentile point at the very top than
  at the 25th percentile, instead of chasing noise. The transform is strictly increasing, so
  rankings are unchanged and :meth:`TargetTransform.inverse` recovers the percentile.

The prior like rate of a new song (``expected_rate``, the ranker's ``p0``) is read off a
*like-rate curve*: an increasing (isotonic, streams-weighted) fit of the training songs' observed
like rate ``likes / streams`` against their likes score. It was first the ratio of the two
expected counts, but a ratio of two noisy predictions of highly correlated counts is mostly
noise: on held-out synthetic songs its rank correlation with the true like probability ranged
from -0.17 to 0.27 over three seeds, against 0.27-0.40 for the likes score alone. A transform
saved without the curve (older models, or fitted without both counts) keeps the ratio.

Saved parameters are, per task and reference group, the sorted distinct counts (at most
``max_knots`` of them, chosen at evenly spaced ranks) with their exact mid-rank percentiles;
between knots, percentiles are interpolated on ``log1p(count)``. Outside the reference range
they are clamped to the end knots.

The reference tables, the like-rate curve and the column checks are in
:mod:`ranker.model.target_tables`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ranker.events import POPULARITY_TASKS
from ranker.model.target_tables import (
    FloatArray,
    _broadcast,
    _column,
    _counts,
    _RateCurve,
    _rows,
    _Table,
    _weeks,
)

CohortMode = Literal["all", "generator_week"]

KIND = "percentile-power"
FORMAT_VERSION = 1
#: Square root: compresses the top tail (see the module docstring for the reasoning).
DEFAULT_GAMMA = 0.5
DEFAULT_MIN_COHORT_SIZE = 50
DEFAULT_MAX_KNOTS = 1024
ALL = "all"


class TargetTransform:
    """Raw counts -> percentile within a reference group -> ``100 * (pct/100) ** gamma``.

    Build with :meth:`fit`; store with :meth:`to_dict` (a JSON-ready dict, kept in the model's
    config.json) and :meth:`from_dict`.
    """

    def __init__(
        self,
        tables: Mapping[str, Mapping[str, _Table]],
        *,
        gamma: float = DEFAULT_GAMMA,
        cohort: CohortMode = "all",
        min_cohort_size: int = DEFAULT_MIN_COHORT_SIZE,
        max_knots: int = DEFAULT_MAX_KNOTS,
        like_rate: _RateCurve | None = None,
    ) -> None:
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive number, got {gamma}")
        if cohort not in ("all", "generator_week"):
            raise ValueError(f"cohort must be 'all' or 'generator_week', got {cohort!r}")
        for task, groups in tables.items():
            if ALL not in groups:
                raise ValueError(f"the reference tables of {task!r} have no {ALL!r} group")
        self._tables = {task: dict(groups) for task, groups in tables.items()}
        self.gamma = float(gamma)
        self.cohort: CohortMode = cohort
        self.min_cohort_size = int(min_cohort_size)
        self.max_knots = int(max_knots)
        self._like_rate = like_rate

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._tables)

    def groups(self, task: str) -> list[str]:
        """The reference groups stored for a task (``all``, ``generator:<g>``, ``cohort:<g>|<week>``)."""
        return sorted(self._table_map(task))

    # Fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        data: Any,
        *,
        tasks: Sequence[str] = POPULARITY_TASKS,
        gamma: float = DEFAULT_GAMMA,
        cohort: CohortMode = "all",
        min_cohort_size: int = DEFAULT_MIN_COHORT_SIZE,
        max_knots: int = DEFAULT_MAX_KNOTS,
        allow_missing: bool = False,
    ) -> TargetTransform:
        """Fit reference distributions from columns ``tasks`` (and ``generator``, ``created_at``
        for cohorts) of a mapping of arrays, a pandas DataFrame or a pyarrow Table.

        Negative or infinite counts are errors naming the rows; so are NaN counts unless
        ``allow_missing`` (then they are left out of the reference).
        """
        if max_knots < 2:
            raise ValueError("max_knots must be >= 2")
        if min_cohort_size < 1:
            raise ValueError("min_cohort_size must be >= 1")
        unknown = [t for t in tasks if t not in POPULARITY_TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be popularity tasks {list(POPULARITY_TASKS)}, got {list(tasks)}")
        columns = {t: _counts(t, _column(data, t), allow_missing=allow_missing) for t in tasks}
        n = len(next(iter(columns.values())))
        if any(len(c) != n for c in columns.values()):
            raise ValueError("the count columns have different lengths")
        levels = _group_keys(cohort, n, data if cohort == "generator_week" else None)
        tables: dict[str, dict[str, _Table]] = {}
        for task, counts in columns.items():
            known = ~np.isnan(counts)
            if not known.any():
                raise ValueError(f"{task} has no known counts to build a reference from")
            groups: dict[str, _Table] = {ALL: _Table.fit(counts[known], max_knots)}
            for keys in levels:
                values = np.asarray(keys, dtype=object)[known]
                kept = counts[known]
                for key in sorted(set(values.tolist())):
                    members = kept[values == key]
                    if len(members) >= min_cohort_size:
                        groups[key] = _Table.fit(members, max_knots)
            tables[task] = groups
        out = cls(tables, gamma=gamma, cohort=cohort, min_cohort_size=min_cohort_size, max_knots=max_knots)
        if "likes" in columns and "streams" in columns:
            gens = _column(data, "generator") if cohort == "generator_week" else None
            created = _column(data, "created_at") if cohort == "generator_week" else None
            likes_score = out._score("likes", columns["likes"], gens, created)
            out._like_rate = _RateCurve.fit(likes_score, columns["likes"], columns["streams"], max_knots)
        return out

    def with_like_rate(
        self, likes_score: npt.ArrayLike, likes: npt.ArrayLike, streams: npt.ArrayLike
    ) -> TargetTransform:
        """A copy whose like-rate curve is refitted: observed ``likes / streams`` (streams-weighted,
        isotonic) against the given likes scores.

        Retraining passes the candidate's *predicted* likes scores, so the curve calibrates what
        the head says of a new song. Fitted against the training targets' scores instead, a curve
        is as steep as the targets are sharp, and a head's predictions, which regress toward the
        mean, would read as over-confident priors.
        """
        scores = np.atleast_1d(np.asarray(likes_score, dtype=np.float64))
        curve = _RateCurve.fit(
            scores,
            _counts("likes", likes, allow_missing=False),
            _counts("streams", streams, allow_missing=False),
            self.max_knots,
        )
        return TargetTransform(
            self._tables,
            gamma=self.gamma,
            cohort=self.cohort,
            min_cohort_size=self.min_cohort_size,
            max_knots=self.max_knots,
            like_rate=curve,
        )

    def _score(self, task: str, counts: FloatArray, generator: Any, created_at: Any) -> FloatArray:
        """Scores of counts in each row's reference group (NaN stays NaN)."""
        pct = self.percentile(task, counts, generator=generator, created_at=created_at, allow_missing=True)
        return self.score_from_percentile(pct)

    # Forward ---------------------------------------------------------------------------------
    def transform(
        self, data: Any, *, tasks: Sequence[str] | None = None, allow_missing: bool = False
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Scores (0-100, float32) per task for the rows of ``data`` (same columns as :meth:`fit`).

        With ``allow_missing``, NaN counts give NaN scores (the head's loss skips them).
        """
        out: dict[str, npt.NDArray[np.float32]] = {}
        for task in tasks or self.tasks:
            counts = _column(data, task)
            generator = created_at = None
            if self.cohort == "generator_week":
                generator, created_at = _column(data, "generator"), _column(data, "created_at")
            pct = self.percentile(task, counts, generator=generator, created_at=created_at, allow_missing=allow_missing)
            out[task] = self.score_from_percentile(pct).astype(np.float32)
        return out

    def percentile(
        self,
        task: str,
        counts: npt.ArrayLike,
        *,
        generator: Any = None,
        created_at: Any = None,
        allow_missing: bool = False,
    ) -> FloatArray:
        """Mid-rank percentiles (0-100) of counts within their reference groups."""
        values = _counts(task, counts, allow_missing=allow_missing)
        tables = self._table_map(task)
        keys = self._resolve(task, len(values), generator, created_at)
        out = np.full(values.shape, np.nan)
        known = ~np.isnan(values)
        for key in set(keys):
            rows = known & (keys == key)
            if rows.any():
                out[rows] = tables[key].percentile(values[rows])
        return out

    def score_from_percentile(self, pct: npt.ArrayLike) -> FloatArray:
        """``100 * (pct/100) ** gamma``."""
        p = np.clip(np.asarray(pct, dtype=np.float64), 0.0, 100.0)
        return 100.0 * (p / 100.0) ** self.gamma

    # Inverse ---------------------------------------------------------------------------------
    def inverse(self, score: npt.ArrayLike) -> FloatArray:
        """The percentile (0-100) a score stands for: ``100 * (score/100) ** (1/gamma)``.

        Applied to a predicted score this is the percentile of the predicted score, not the
        mean of the predicted percentile distribution.
        """
        s = np.clip(np.asarray(score, dtype=np.float64), 0.0, 100.0)
        return 100.0 * (s / 100.0) ** (1.0 / self.gamma)

    def expected_count(
        self, task: str, score: npt.ArrayLike, *, generator: Any = None, created_at: Any = None
    ) -> FloatArray:
        """The raw count at the percentile a score stands for, in the song's reference group."""
        pct = np.atleast_1d(self.inverse(score))
        tables = self._table_map(task)
        keys = self._resolve(task, len(pct), generator, created_at)
        out = np.empty(pct.shape)
        for key in set(keys):
            rows = keys == key
            out[rows] = tables[key].count_at(pct[rows])
        return out

    def expected_rate(
        self,
        likes_score: npt.ArrayLike,
        streams_score: npt.ArrayLike,
        *,
        generator: Any = None,
        created_at: Any = None,
    ) -> FloatArray:
        """The like rate (likes per stream, in [0, 1]) expected of a song with these scores.

        Meant as the prior mean ``p0`` of a Beta-Binomial like rate for a song without
        engagement yet. With a like-rate curve (see the module docstring) it depends on the
        likes score only; without one it is the ratio of the two expected counts (at least one
        stream is assumed, so the rate stays finite).
        """
        if self._like_rate is not None:
            return self._like_rate.rate(np.atleast_1d(np.asarray(likes_score, dtype=np.float64)))
        likes = self.expected_count("likes", likes_score, generator=generator, created_at=created_at)
        streams = self.expected_count("streams", streams_score, generator=generator, created_at=created_at)
        return np.clip(likes / np.maximum(streams, 1.0), 0.0, 1.0)

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (what a model's config.json keeps as ``target_transform``)."""
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "gamma": self.gamma,
            "cohort": self.cohort,
            "min_cohort_size": self.min_cohort_size,
            "max_knots": self.max_knots,
            "tables": {
                task: {key: table.to_dict() for key, table in sorted(groups.items())}
                for task, groups in self._tables.items()
            },
            **({"like_rate": self._like_rate.to_dict()} if self._like_rate is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetTransform:
        """Rebuild from :meth:`to_dict` output, validating every table."""
        if data.get("kind") != KIND or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"not a {KIND} v{FORMAT_VERSION} target transform: "
                f"kind={data.get('kind')!r}, format_version={data.get('format_version')!r}"
            )
        raw_tables = data.get("tables")
        if not isinstance(raw_tables, Mapping) or not raw_tables:
            raise ValueError("target transform has no tables")
        tables: dict[str, dict[str, _Table]] = {}
        for task, groups in raw_tables.items():
            if task not in POPULARITY_TASKS or not isinstance(groups, Mapping):
                raise ValueError(f"target transform has an unexpected task {task!r}")
            tables[task] = {key: _Table.from_dict(f"{task}/{key}", t) for key, t in groups.items()}
        return cls(
            tables,
            gamma=float(data["gamma"]),
            cohort=data.get("cohort", "all"),
            min_cohort_size=int(data.get("min_cohort_size", DEFAULT_MIN_COHORT_SIZE)),
            max_knots=int(data.get("max_knots", DEFAULT_MAX_KNOTS)),
            like_rate=_RateCurve.from_dict(data["like_rate"]) if data.get("like_rate") is not None else None,
        )

    # Internals -------------------------------------------------------------------------------
    def _table_map(self, task: str) -> dict[str, _Table]:
        try:
            return self._tables[task]
        except KeyError:
            raise ValueError(f"no reference for task {task!r}; this transform covers {list(self.tasks)}") from None

    def _resolve(self, task: str, n: int, generator: Any, created_at: Any) -> npt.NDArray[Any]:
        """Per row, the most specific stored group: cohort, then generator, then all."""
        keys = np.full(n, ALL, dtype=object)
        if self.cohort != "generator_week" or (generator is None and created_at is None):
            return keys
        tables = self._table_map(task)
        gens = _broadcast(generator, n, "generator")
        gen_keys = [f"generator:{g}" for g in gens]
        if created_at is None:
            cohort_keys: list[str | None] = [None] * n
        else:
            weeks = _weeks(_broadcast(created_at, n, "created_at"))
            cohort_keys = [f"cohort:{g}|{w}" for g, w in zip(gens, weeks, strict=True)]
        for i in range(n):
            c, g = cohort_keys[i], gen_keys[i]
            if c is not None and c in tables:
                keys[i] = c
            elif g in tables:
                keys[i] = g
        return keys


def _group_keys(cohort: CohortMode, n: int, data: Any) -> list[list[str]]:
    """The group key of every row at each level finer than ``all``."""
    if cohort == "all":
        return []
    generators = [str(g) if g is not None else "" for g in _column(data, "generator").tolist()]
    missing = np.array([not g or g == "nan" for g in generators], dtype=bool)
    if len(generators) != n:
        raise ValueError("the generator column has a different length from the counts")
    if missing.any():
        raise ValueError(f"generator is missing at {_rows(missing)}")
    raw_created = _column(data, "created_at")
    created = list(raw_created) if raw_created.dtype.kind == "M" else raw_created.tolist()
    weeks = _weeks(created)
    return [
        [f"generator:{g}" for g in generators],
        [f"cohort:{g}|{w}" for g, w in zip(generators, weeks, strict=True)],
    ]
