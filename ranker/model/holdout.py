"""The generator holdout (issue 17): train without a generator, then ask how the model fares on it.

A new generative system is the case a ranking prior fails on silently. This trains a head
(an ensemble, when ``config.ensemble`` > 1) on every song but generator ``G``'s, with the
usual seeded random validation split among those songs for early stopping, and measures on
``G``'s songs and, for comparison, on the in-distribution validation songs:

- per task: Spearman against the truth, the calibration error (predictions cut into 10
  equal-count bins; the song-weighted mean over bins of |mean prediction - mean truth|, in
  the task's units: 0-100 for popularity, 1-5 for aesthetics), and the Spearman between the
  ensemble's spread and the absolute error (does uncertainty predict error? None for one head);
- the OOD distance's ROC AUC separating ``G``'s songs from the in-distribution validation
  songs (1: every ``G`` song is further than every validation song; 0.5: no separation).

``G``'s songs never touch training, early stopping, the target transform or the OOD fit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ranker.catalog import Catalog, CatalogError
from ranker.features import FeatureSet
from ranker.model.artifact import ScoringModel
from ranker.model.battles import roc_auc
from ranker.model.evaluate import _pearson, _rank, align, as_catalog, regression_metrics, target_matrix
from ranker.model.report import json_safe
from ranker.model.train import train_head
from ranker.model.train_config import TrainConfig, TrainResult

CALIBRATION_BINS = 10


def calibration_error(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, bins: int = CALIBRATION_BINS) -> float:
    """Song-weighted mean over equal-count prediction bins of |mean prediction - mean truth|."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    if not len(t):
        return math.nan
    order = np.argsort(p, kind="stable")
    parts = np.array_split(order, min(bins, len(t)))
    return float(sum(len(b) * abs(p[b].mean() - t[b].mean()) for b in parts) / len(t))


def spread_error_spearman(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, spread: npt.ArrayLike) -> float:
    """Spearman between the spread and the absolute error (NaN when either is constant)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    s = np.asarray(spread, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(p) & np.isfinite(s)
    if keep.sum() < 3:
        return math.nan
    return _pearson(_rank(s[keep]), _rank(np.abs(p[keep] - t[keep])))


def task_metrics(
    model: ScoringModel, features: FeatureSet, catalog: Catalog, song_ids: list[str]
) -> tuple[dict[str, dict[str, float | None]], npt.NDArray[np.float64] | None]:
    """Per-task metrics of ``model`` on ``song_ids`` and their OOD distances (None without an OOD model)."""
    from ranker.model.targets import TargetTransform

    al = align(features, catalog, song_ids)
    tasks = [t for t in model.tasks if catalog.has(t)]
    transform = TargetTransform.from_dict(model.target_transform) if model.target_transform else None
    truth = target_matrix(catalog, al.catalog_rows, tasks, transform)
    x = features.layers[al.feature_rows]
    pred = model.predict_full(x)
    out: dict[str, dict[str, float | None]] = {}
    for j, t in enumerate(tasks):
        col = model.tasks.index(t)
        reg = regression_metrics(truth[:, j], pred.mean[:, col])
        out[t] = {
            "spearman": reg["spearman"],
            "mae": reg["mae"],
            "calibration_error": calibration_error(truth[:, j], pred.mean[:, col]),
            "spread_error_spearman": (
                spread_error_spearman(truth[:, j], pred.mean[:, col], pred.spread[:, col])
                if pred.spread is not None
                else None
            ),
            "mean_spread": float(pred.spread[:, col].mean()) if pred.spread is not None else None,
        }
    distance = model.ood.distance(x) if model.ood is not None else None
    return out, distance


def evaluate_holdout(
    features: FeatureSet,
    catalog: Catalog | str | Path,
    generator: str,
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train without ``generator``, evaluate on it; returns the training result and the report."""
    cfg = config or TrainConfig()
    if cfg.holdout_generators:
        raise CatalogError("the generator holdout makes its own split: leave holdout_generators empty")
    cat = as_catalog(catalog)
    if not cat.has("generator"):
        raise CatalogError(f"catalog {cat.path}: a generator holdout needs the generator column")
    al = align(features, cat)
    gens = np.asarray([str(g) for g in cat.column("generator")[al.catalog_rows]], dtype=object)
    known = sorted(set(gens.tolist()))
    if generator not in known:
        raise CatalogError(f"generator {generator!r} has no songs; the catalog's generators: {known}")
    held = [s for s, g in zip(al.song_ids, gens, strict=True) if g == generator]
    rest = [s for s, g in zip(al.song_ids, gens, strict=True) if g != generator]
    result = train_head(features, cat, cfg, song_ids=rest, progress=progress)
    model = result.model
    on_holdout, d_holdout = task_metrics(model, features, cat, held)
    in_dist, d_in = task_metrics(model, features, cat, result.val_song_ids) if result.val_song_ids else ({}, None)
    auc: float | None = None
    if d_holdout is not None and d_in is not None:
        labels = np.r_[np.ones(len(d_holdout)), np.zeros(len(d_in))]
        auc = roc_auc(labels, np.r_[d_holdout, d_in])
    pct = model.ood.percentile(d_holdout) if model.ood is not None and d_holdout is not None else None
    report = {
        "holdout_generator": generator,
        "model_version": model.version,
        "ensemble": model.ensemble_size,
        "n_train": len(result.train_song_ids),
        "n_in_distribution": len(result.val_song_ids),
        "n_holdout": len(held),
        "holdout": on_holdout,
        "in_distribution": in_dist,
        "ood_auc": auc,
        "holdout_mean_ood_percentile": float(pct.mean()) if pct is not None else None,
    }
    return result, json_safe(report)
