"""Measuring a head: per-task song-level metrics against a catalog's truth.

Song level, as in the paper: Pearson, Spearman, MAE and MSE per task between the catalog's
truth and the head's scores. Popularity truth is the catalog's raw counts mapped through the
*model's own* saved target transform (percentiles of its training split), so a head is judged
on the scale it was trained for; a model without one (the released checkpoint, an untrained
head) gets a transform fitted on the evaluated catalog itself, and the report says so.

Also here, because training needs them as much as evaluation: matching catalog rows to stored
features, the target matrix, and song-level predictions. Pairwise preferences (battles) are in
:mod:`ranker.model.battles`; tables and JSON output in :mod:`ranker.model.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ranker.catalog import Catalog, CatalogError, read_catalog
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS
from ranker.model.report import METRICS, json_safe

if TYPE_CHECKING:
    from ranker.features import FeatureSet
    from ranker.model.artifact import ScoringModel
    from ranker.model.battles import BattleReport
    from ranker.model.targets import TargetTransform

_MAX_NAMED = 10

FloatArray = npt.NDArray[np.float64]


def _describe_rows(rows: Sequence[int]) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_NAMED])
    more = f" and {len(rows) - _MAX_NAMED} more" if len(rows) > _MAX_NAMED else ""
    return f"rows {shown}{more}"


# --------------------------------------------------------------------------------------
# Catalog <-> features
# --------------------------------------------------------------------------------------


def as_catalog(catalog: Catalog | str | Path) -> Catalog:
    """A validated :class:`Catalog` from a path, or the catalog itself."""
    return catalog if isinstance(catalog, Catalog) else read_catalog(catalog)


@dataclass(frozen=True)
class Alignment:
    """Catalog rows matched to feature rows; songs whose embedding failed are listed, not matched."""

    catalog_rows: npt.NDArray[np.int64]
    feature_rows: npt.NDArray[np.int64]
    song_ids: list[str]
    skipped_failed: list[str]

    def __len__(self) -> int:
        return len(self.song_ids)


def align(features: FeatureSet, catalog: Catalog, song_ids: Sequence[str] | None = None) -> Alignment:
    """Match catalog rows (all, or those of ``song_ids``) to stored features.

    A catalog song with no features is a :class:`CatalogError` naming its rows, unless its
    embedding was recorded as failed (then it is skipped and listed): a catalog that does not
    match its features directory must never be trained on silently.
    """
    ids = catalog.song_ids
    if song_ids is not None:
        wanted = set(song_ids)
        unknown = sorted(wanted - set(ids))
        if unknown:
            raise CatalogError(
                f"catalog {catalog.path} has no rows for {len(unknown)} requested songs (e.g. {unknown[:_MAX_NAMED]})"
            )
        rows = [i for i, s in enumerate(ids) if s in wanted]
    else:
        rows = list(range(len(ids)))
    index = features.index()
    cat_rows: list[int] = []
    feat_rows: list[int] = []
    failed: list[str] = []
    unknown_rows: list[int] = []
    for i in rows:
        sid = ids[i]
        j = index.get(sid)
        if j is not None:
            cat_rows.append(i)
            feat_rows.append(j)
        elif sid in features.failed:
            failed.append(sid)
        else:
            unknown_rows.append(i)
    if unknown_rows:
        example = [ids[i] for i in unknown_rows[:3]]
        where = f" in {features.directory}" if features.directory else ""
        raise CatalogError(
            f"catalog {catalog.path}: no features{where} for song_id at {_describe_rows(unknown_rows)} "
            f"(e.g. {example}); embed them first (`apexrank embed --catalog {catalog.path} --out DIR`) "
            "or use the catalog the features were made from"
        )
    if not cat_rows:
        raise CatalogError(f"catalog {catalog.path}: none of its songs has features")
    return Alignment(
        catalog_rows=np.asarray(cat_rows, dtype=np.int64),
        feature_rows=np.asarray(feat_rows, dtype=np.int64),
        song_ids=[ids[i] for i in cat_rows],
        skipped_failed=failed,
    )


def require_columns(catalog: Catalog, tasks: Sequence[str]) -> None:
    """Raise :class:`CatalogError` if the catalog lacks a column the tasks need."""
    missing = [t for t in tasks if not catalog.has(t)]
    if missing:
        hint = ""
        if set(missing) & set(AESTHETIC_TASKS) and not set(missing) & set(POPULARITY_TASKS):
            hint = " (train with tasks=popularity, or add the SongEval aesthetic columns)"
        raise CatalogError(f"catalog {catalog.path} lacks the target column(s) {', '.join(missing)}{hint}")


def count_columns(catalog: Catalog, rows: npt.ArrayLike) -> dict[str, np.ndarray]:
    """The columns a :class:`TargetTransform` reads (counts, generator, created_at) for ``rows``."""
    idx = np.asarray(rows, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in (*POPULARITY_TASKS, "generator", "created_at"):
        if catalog.has(name):
            out[name] = catalog.column(name)[idx]
    return out


def target_matrix(
    catalog: Catalog, rows: npt.ArrayLike, tasks: Sequence[str], transform: TargetTransform | None
) -> npt.NDArray[np.float32]:
    """Targets (N, T) on each task's output scale; NaN where an aesthetic label is missing."""
    idx = np.asarray(rows, dtype=np.int64)
    out = np.full((len(idx), len(tasks)), np.nan, dtype=np.float32)
    pop = [t for t in tasks if t in POPULARITY_TASKS]
    if pop:
        if transform is None:
            raise ValueError("popularity targets need a target transform")
        try:
            scores = transform.transform(count_columns(catalog, idx), tasks=pop)
        except ValueError as exc:
            raise CatalogError(f"catalog {catalog.path}: {exc}") from exc
        for t in pop:
            out[:, tasks.index(t)] = scores[t]
    for t in tasks:
        if t in AESTHETIC_TASKS:
            col = catalog.column(t)[idx]
            out[:, tasks.index(t)] = np.asarray(col, dtype=np.float64).astype(np.float32)
    return out


def fit_transform(
    catalog: Catalog,
    rows: npt.ArrayLike,
    *,
    gamma: float | None = None,
    cohort: str = "all",
    min_cohort_size: int | None = None,
) -> TargetTransform:
    """A target transform fitted on the counts of ``rows`` (the training split)."""
    from ranker.model.targets import DEFAULT_GAMMA, DEFAULT_MIN_COHORT_SIZE, TargetTransform

    try:
        return TargetTransform.fit(
            count_columns(catalog, rows),
            gamma=DEFAULT_GAMMA if gamma is None else gamma,
            cohort=cohort,  # type: ignore[arg-type]
            min_cohort_size=DEFAULT_MIN_COHORT_SIZE if min_cohort_size is None else min_cohort_size,
        )
    except ValueError as exc:
        raise CatalogError(f"catalog {catalog.path}: {exc}") from exc


# --------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------


def model_input_mode(model: ScoringModel) -> str:
    """``segment`` for heads trained per segment (their song score averages segment scores)."""
    training = model.card.training or {}
    mode = training.get("input_mode")
    if mode is None and isinstance(training.get("config"), Mapping):
        mode = training["config"].get("input_mode")
    return "segment" if mode == "segment" else "song"


def predict_songs(
    model: ScoringModel,
    features: FeatureSet,
    rows: npt.ArrayLike | None = None,
    *,
    input_mode: str | None = None,
) -> npt.NDArray[np.float32]:
    """Scores (N, T) of the songs at ``rows`` (default all), columns in ``model.tasks`` order.

    Song mode scores the song's pooled layers. Segment mode (a head trained per segment) scores
    every segment and averages per song, weighting segments by their real frames: a 3 s tail
    does not count as much as a full 30 s segment.
    """
    idx = np.arange(len(features)) if rows is None else np.asarray(rows, dtype=np.int64)
    mode = input_mode or model_input_mode(model)
    if mode != "segment":
        return model.predict(features.layers[idx])
    sub = features.subset(idx)
    seg = sub.segments()
    pred = model.predict(seg.features).astype(np.float64)
    w = np.maximum(seg.frames.astype(np.float64), 1.0)
    total = np.bincount(seg.song_index, weights=w, minlength=len(idx))
    out = np.empty((len(idx), pred.shape[1]), dtype=np.float32)
    for t in range(pred.shape[1]):
        out[:, t] = np.bincount(seg.song_index, weights=w * pred[:, t], minlength=len(idx)) / total
    return out


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _rank(x: FloatArray) -> FloatArray:
    from scipy.stats import rankdata

    return np.asarray(rankdata(x), dtype=np.float64)


def _pearson(a: FloatArray, b: FloatArray) -> float:
    if len(a) < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def regression_metrics(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> dict[str, float]:
    """Pearson, Spearman (average ranks for ties), MAE and MSE; NaN correlations for constant input."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    if len(t) == 0:
        return dict.fromkeys(METRICS, math.nan)
    err = p - t
    return {
        "pearson": _pearson(t, p),
        "spearman": _pearson(_rank(t), _rank(p)),
        "mae": float(np.abs(err).mean()),
        "mse": float((err**2).mean()),
    }


@dataclass
class EvalReport:
    """Metrics per task plus what a reader needs to trust them."""

    metrics: dict[str, dict[str, float]]
    n_songs: int
    counts: dict[str, int]
    skipped_failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    battles: BattleReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "metrics": self.metrics,
                "n_songs": self.n_songs,
                "counts": self.counts,
                "skipped_failed": len(self.skipped_failed),
                "notes": self.notes,
                "battles": self.battles.to_dict() if self.battles is not None else None,
            }
        )


def evaluate_report(
    model: ScoringModel,
    features: FeatureSet,
    catalog: Catalog | str | Path,
    *,
    song_ids: Sequence[str] | None = None,
    input_mode: str | None = None,
) -> EvalReport:
    """Song-level metrics of every model task the catalog has truth for (see the module doc)."""
    from ranker.model.targets import TargetTransform

    cat = as_catalog(catalog)
    _check_encoder(model, features)
    al = align(features, cat, song_ids)
    notes: list[str] = []
    tasks = list(model.tasks)
    present = [t for t in tasks if cat.has(t)]
    for t in tasks:
        if t not in present:
            notes.append(f"{t}: the catalog has no {t} column; not evaluated")
    transform: TargetTransform | None = None
    if any(t in POPULARITY_TASKS for t in present):
        if model.target_transform is not None:
            transform = TargetTransform.from_dict(model.target_transform)
        else:
            transform = fit_transform(cat, al.catalog_rows)
            notes.append(
                "the model carries no target transform: popularity truth uses percentiles of the "
                f"evaluated catalog itself (gamma={transform.gamma}); MAE/MSE are on that scale"
            )
    truth = target_matrix(cat, al.catalog_rows, present, transform)
    pred = predict_songs(model, features, al.feature_rows, input_mode=input_mode)
    metrics: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for j, t in enumerate(present):
        y = truth[:, j]
        metrics[t] = regression_metrics(y, pred[:, tasks.index(t)])
        counts[t] = int(np.isfinite(y).sum())
    return EvalReport(metrics=metrics, n_songs=len(al), counts=counts, skipped_failed=al.skipped_failed, notes=notes)


def evaluate(
    model: ScoringModel,
    features: FeatureSet,
    catalog: Catalog | str | Path,
    *,
    song_ids: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {"pearson", "spearman", "mae", "mse"}}`` at song level (see :func:`evaluate_report`)."""
    return evaluate_report(model, features, catalog, song_ids=song_ids).metrics


def _check_encoder(model: ScoringModel, features: FeatureSet) -> None:
    from ranker.features import FeatureStoreError

    if (features.n_layers, features.dim) != (model.n_layers, model.input_dim):
        raise FeatureStoreError(
            f"model {model.version} expects features ({model.n_layers}, {model.input_dim}); "
            f"these are ({features.n_layers}, {features.dim}) from {features.encoder_id}"
        )
    if model.encoder_id != features.encoder_id:
        raise FeatureStoreError(
            f"model {model.version} was trained on encoder {model.encoder_id!r}, these features come "
            f"from {features.encoder_id!r}"
        )
