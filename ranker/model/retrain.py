"""Periodic retraining from observed engagement, promoting a candidate only when it is better.

One run:

1. **Training set.** Songs with at least ``min_plays`` plays in the engagement log,
   their pooled layers from the worker's embedding store (audio is never decoded
   again), and their observed counts: ``streams`` = plays, ``likes`` = likes minus
   unlikes. The five aesthetic targets are the current head's own predictions
   (pseudo-labels, as SongEval's were in the paper), so that learning popularity
   from engagement does not drift the aesthetic outputs.

   With ``targets="exposure"`` (the default) the likes target is the song's likes
   *at the median exposure*: its like rate, smoothed toward the pooled rate with
   the weight of ``rate_prior_plays`` plays, times the median play count. In a
   closed loop a song's play count says mostly where the feed placed it, and raw
   likes inherit that; the like rate per play is what the audience decided. The
   candidate's like-rate curve is refitted to its predictions at the incumbent's level
   (see ``_exposure_like_rate``).
   ``targets="counts"`` trains on the raw counts.
2. **Time-based holdout.** The newest ``holdout_fraction`` of those songs (by
   ``created_at``) never enters training; both models are judged on them.
3. **Candidate.** Trained warm from the current head, or from scratch (a setting),
   with the same target transform recipe, fitted on the training songs. With
   ``likes_model="readout"`` (the default) its likes output is a like-rate read-out of the
   embedding (``ranker.model.readout``), fitted on the plays and likes of every played song
   created before the holdout's first (below ``min_plays`` too: its likelihood weighs a song
   by its plays), and with fewer than ``min_songs_head`` training songs a trained head is
   kept as it is, warm start or not: on a few dozen songs fine-tuning it made its likes worse
   and moved its streams output at random (docs/model.md). A seeded, untrained head is
   trained as before.
4. **Gate.** Spearman of streams and of likes on the holdout. The candidate is
   promoted only when the mean of the two improves by at least ``margin`` and
   neither gets worse by more than ``margin``.
5. **Promotion.** The candidate is saved as a new version with its report, and
   ``models/current`` is switched atomically, unless it moved away from the model the
   candidate was judged against since that model was loaded (an operator's promotion or
   rollback wins). The caller then rescores the songs inside the cold-start window and
   announces the new version.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.catalog import Catalog
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS
from ranker.features import FeatureSet
from ranker.model.artifact import ScoringModel
from ranker.model.evaluate import evaluate, fit_transform
from ranker.model.readout import fit_like_readout
from ranker.model.registry import RETRAIN_REPORT, CurrentMoved, promote_if_serving, resolve_model_dir
from ranker.model.targets import TargetTransform
from ranker.model.train import train_head
from ranker.model.train_config import TrainConfig

log = logging.getLogger(__name__)

#: ``exposure``: likes at the median exposure (like rate x median plays); ``counts``: raw counts.
TargetMode = Literal["exposure", "counts"]
#: ``readout``: the candidate's likes output is a like-rate read-out of the embedding; ``head``: the head's.
LikesModel = Literal["readout", "head"]


@dataclass(frozen=True)
class Observed:
    """Per-song engagement aggregated from the log, plus the song's metadata."""

    song_ids: list[str]
    plays: np.ndarray
    likes: np.ndarray
    generators: list[str]
    created_at: list[datetime]


@dataclass
class RetrainReport:
    promoted: bool
    reason: str
    current_version: str
    candidate_version: str | None
    n_train: int
    n_holdout: int
    current: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)  # wall time per step (gather, train, ...)
    #: The off-policy gate's figures (consumers.retrain_gate), when it was asked.
    off_policy: dict[str, Any] = field(default_factory=dict)
    #: The examination weights this run estimated and stored (ranker.model.examination), when it did.
    examination: dict[str, Any] | None = None
    #: Each generator's calibration factor this run fitted (consumers.retrain), when it did.
    generator_calibration: dict[str, Any] | None = None
    #: Songs of the cold-start window the run rescored, per pass (consumers.retrain).
    rescored: dict[str, int] = field(default_factory=dict)
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def promotion_owed(report: RetrainReport) -> dict[str, Any]:
    """What a promotion still owes once ``current`` has moved (:func:`~ranker.model.registry.mark_pending`):
    the version to rescore the cold-start window with, and what ``models.promoted`` says of it."""
    return {
        "model_version": report.candidate_version,
        "previous_version": report.current_version,
        "model_dir": report.model_dir,
        "holdout_spearman": report.candidate,
    }


def aggregate_engagement(log_table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(song_ids, plays, likes) from engagement-log rows; likes floor at zero."""
    if log_table.num_rows == 0:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    types = log_table.column("type")
    signed = pa.table(
        {
            "song_id": log_table.column("song_id"),
            "play": pc.cast(pc.equal(types, "play"), pa.int64()),
            "like": pc.subtract(
                pc.cast(pc.equal(types, "like"), pa.int64()), pc.cast(pc.equal(types, "unlike"), pa.int64())
            ),
        }
    )
    grouped = signed.group_by("song_id").aggregate([("play", "sum"), ("like", "sum")])
    ids = [str(s) for s in grouped.column("song_id").to_pylist()]
    plays = np.asarray(grouped.column("play_sum").to_numpy(), dtype=np.int64)
    likes = np.clip(np.asarray(grouped.column("like_sum").to_numpy(), dtype=np.int64), 0, None)
    order = np.argsort(ids)
    return [ids[i] for i in order], plays[order], np.minimum(likes[order], plays[order])


def smoothed_like_rates(plays: np.ndarray, likes: np.ndarray, prior_plays: float) -> np.ndarray:
    """Each song's like rate ``(likes + k * pooled) / (plays + k)``, ``k = prior_plays``.

    ``pooled`` is the like rate of all songs together (Beta-Binomial smoothing, as the feed's
    posterior, but toward a prior no model produced, so that the holdout does not favour the
    incumbent).
    """
    plays = np.asarray(plays, dtype=np.float64)
    likes = np.asarray(likes, dtype=np.float64)
    if plays.size == 0:
        return np.zeros(0, np.float64)
    pooled = float(likes.sum() / max(plays.sum(), 1.0))
    den = plays + prior_plays
    return np.divide(likes + prior_plays * pooled, den, out=np.full_like(den, pooled), where=den > 0)


def exposure_adjusted_likes(plays: np.ndarray, likes: np.ndarray, prior_plays: float) -> np.ndarray:
    """Each song's likes at the median play count: its smoothed like rate x the median plays."""
    return smoothed_like_rates(plays, likes, prior_plays) * _median(np.asarray(plays))


def _median(values: np.ndarray) -> float:
    return max(float(np.median(values)), 1.0) if len(values) else 1.0


def _exposure_like_rate(
    current: ScoringModel,
    candidate: ScoringModel,
    current_scores: np.ndarray,
    candidate_scores: np.ndarray,
    rates: np.ndarray,
) -> dict[str, Any]:
    """The candidate's transform with the like-rate curve an exposure-trained head should carry.

    ``*_scores`` are each model's predictions (all tasks) on the training songs, ``rates``
    their smoothed like rates. The curve is the prior like rate of a *new* song. Its shape is
    refitted: an increasing fit of the rates against the candidate's predicted likes score,
    one vote per song (weighting by plays would let the feed's few big hits set it). Its level
    is the incumbent's: the songs a retrain sees are the ones the feed chose to play, and their
    like rates run higher than a new song's, so a curve fitted on them alone would put every
    unplayed song above songs with proven rates (in the loop simulation that cost more like
    rate than the better ranking won). The curve is scaled so that, over the training songs,
    the candidate's mean prior equals the incumbent's; the feed's calibration tracks the level
    from there. When the incumbent has no like-rate curve (a first head, or a transform saved
    before curves existed) or its mean prior is not positive, the fitted level is kept.
    """
    assert candidate.target_transform is not None
    predicted = candidate_scores[:, list(candidate.tasks).index("likes")]
    refit = TargetTransform.from_dict(candidate.target_transform).with_like_rate(predicted, rates, np.ones(len(rates)))
    out = refit.to_dict()
    previous = current.target_transform
    if previous is None or "like_rate" not in previous or "like_rate" not in out or "likes" not in current.tasks:
        return out
    incumbent = TargetTransform.from_dict(previous)
    cols = [list(current.tasks).index(t) for t in ("likes", "streams")]
    old_mean = float(np.mean(incumbent.expected_rate(current_scores[:, cols[0]], current_scores[:, cols[1]])))
    new_mean = float(np.mean(refit.expected_rate(predicted, predicted)))
    if new_mean > 0 and old_mean > 0 and np.isfinite(old_mean):
        y = np.clip(np.asarray(out["like_rate"]["y"]) * (old_mean / new_mean), 0.0, 1.0)
        out["like_rate"] = {"x": out["like_rate"]["x"], "y": y.tolist()}
    return out


def _with_readout(
    candidate: ScoringModel,
    features: FeatureSet,
    observed: Observed,
    rows: np.ndarray,
    *,
    seed: int,
    training: dict[str, Any],
) -> ScoringModel:
    """The candidate with a like-rate read-out fitted on ``rows``' plays and likes (see ranker.model.readout).

    The score keeps the target transform's power, so a likes score means what it meant.
    """
    gamma = TargetTransform.from_dict(candidate.target_transform).gamma if candidate.target_transform else 1.0
    fitted = fit_like_readout(
        features.layers[rows].reshape(len(rows), -1),
        observed.plays[rows],
        observed.likes[rows],
        gamma=gamma,
        seed=seed,
    )
    log.info("like read-out: %d songs, %d plays, penalty %g per song", fitted.n_songs, fitted.n_plays, fitted.l2)
    transform = candidate.target_transform
    curve = None if transform is None else {**transform, "like_rate": fitted.rate_curve()}
    return candidate.with_like_readout(fitted, training=training, target_transform=curve)


def training_catalog(
    observed: Observed,
    rows: np.ndarray,
    pseudo: np.ndarray,
    tasks: Sequence[str],
    likes: np.ndarray | None = None,
) -> Catalog:
    """An in-memory catalog for ``train_head``/``evaluate``: counts plus aesthetic pseudo-labels.

    ``likes`` replaces the observed likes column (exposure-adjusted targets).
    """
    cols: dict[str, Any] = {
        "song_id": [observed.song_ids[i] for i in rows],
        "audio_uri": ["embedding-store:" + observed.song_ids[i] for i in rows],
        "generator": [observed.generators[i] for i in rows],
        "created_at": pa.array([observed.created_at[i] for i in rows], pa.timestamp("us", tz="UTC")),
        "streams": observed.plays[rows].astype(np.int64),
        "likes": observed.likes[rows].astype(np.int64) if likes is None else np.asarray(likes, np.float64)[rows],
    }
    for j, task in enumerate(tasks):
        if task in AESTHETIC_TASKS:
            cols[task] = pseudo[:, j].astype(np.float64)
    return Catalog(table=pa.table(cols), path=Path("<engagement log>"))


def gate(current: dict[str, float], candidate: dict[str, float], margin: float) -> tuple[bool, str]:
    """Promote when mean Spearman(streams, likes) gains >= margin and neither loses > margin."""
    cur = [current[t] for t in POPULARITY_TASKS]
    new = [candidate[t] for t in POPULARITY_TASKS]
    if not all(np.isfinite(cur + new)):
        return False, "Spearman is undefined on the holdout (constant predictions or targets)"
    gain = float(np.mean(new) - np.mean(cur))
    worst = min(n - c for n, c in zip(new, cur, strict=True))
    if gain >= margin and worst >= -margin:
        return True, f"mean Spearman gain {gain:+.4f} >= margin {margin}"
    return False, f"mean Spearman gain {gain:+.4f} (worst task {worst:+.4f}) below margin {margin}"


#: A second question for a candidate: ``(current, candidate) -> (promote?, why, figures)``.
Judge = Callable[[ScoringModel, ScoringModel], tuple[bool, str, dict[str, Any]]]


def retrain(
    current: ScoringModel,
    features: FeatureSet,
    observed: Observed,
    *,
    models_root: Path,
    holdout_fraction: float,
    margin: float,
    warm_start: bool,
    train_config: TrainConfig,
    targets: TargetMode = "exposure",
    rate_prior_plays: float = 20.0,
    likes_model: LikesModel = "readout",
    min_songs_head: int = 1000,
    min_plays: int = 1,
    progress: bool = False,
    judge: Judge | None = None,
    serving: Path | Literal["now"] | None = "now",
) -> RetrainReport:
    """Train, compare and maybe promote; see the module docstring.

    ``serving``: the directory ``current`` named when ``current`` was loaded (None: none); the
    candidate is promoted only while it still does. ``"now"``: what it names when this call starts,
    for a caller that loaded ``current`` just before.

    ``observed`` may hold songs below ``min_plays``: only the read-out learns from them (those
    created before the holdout's first song), since its likelihood weighs each song by its plays.
    ``judge(current, candidate) -> (ok, why, figures)``: a second question a candidate that passes the
    Spearman gate must pass too (the off-policy like rate of its picks: consumers.retrain_gate).
    """
    if serving == "now":
        serving = resolve_model_dir(models_root)
    created = np.array([d.timestamp() for d in observed.created_at])
    eligible = np.flatnonzero(np.asarray(observed.plays) >= min_plays)
    n = len(eligible)
    order = eligible[np.argsort(created[eligible], kind="stable")]
    n_hold = max(1, round(n * holdout_fraction))
    holdout, train = np.sort(order[n - n_hold :]), np.sort(order[: n - n_hold])
    if len(train) < 8 or len(holdout) < 4:
        return RetrainReport(
            False, f"too few songs past the exposure threshold ({n})", current.version, None, len(train), len(holdout)
        )
    began = time.perf_counter()
    rows = np.arange(len(observed.song_ids))
    pseudo = current.predict(features.layers)
    readout = likes_model == "readout" and "likes" in current.tasks
    rates = adjusted = None
    if targets == "exposure":
        rates = smoothed_like_rates(observed.plays, observed.likes, rate_prior_plays)
        adjusted = rates * _median(observed.plays[eligible])
    catalog = training_catalog(observed, rows, pseudo, current.tasks, likes=adjusted)
    train_ids = [observed.song_ids[i] for i in train]
    hold_ids = [observed.song_ids[i] for i in holdout]

    if readout and len(train) < min_songs_head and current.trained:
        # Too few songs to move a trained deep head for the better: keep it, refit the read-out.
        candidate = current
        if candidate.target_transform is None:  # a seeded head: the transform a trained one would have
            fitted = fit_transform(
                catalog,
                train,
                gamma=train_config.gamma,
                cohort=train_config.cohort,
                min_cohort_size=train_config.min_cohort_size,
            )
            candidate = candidate.with_target_transform(fitted.to_dict())
    else:
        if warm_start and current.trained and current.ensemble_size != train_config.ensemble:
            # A retrain keeps the serving model's ensemble: each member warm-starts from its own.
            train_config = train_config.model_copy(update={"ensemble": current.ensemble_size})
        candidate = train_head(
            features, catalog, train_config, song_ids=train_ids, init=current if warm_start else None, progress=progress
        ).model
    if readout:
        before = np.flatnonzero((created < created[holdout].min()) & (np.asarray(observed.plays) > 0))
        record = {"retrain_targets": targets, "rate_prior_plays": rate_prior_plays, "likes_model": likes_model}
        rows_fit = np.union1d(train, before)
        candidate = _with_readout(candidate, features, observed, rows_fit, seed=train_config.seed, training=record)
    elif rates is not None and candidate.target_transform is not None:
        transform = _exposure_like_rate(
            current,
            candidate,
            pseudo[train],
            candidate.predict(features.layers)[train],  # all songs, then rows: no copy of the features
            rates[train],
        )
        candidate = candidate.with_target_transform(
            transform, training={"retrain_targets": targets, "rate_prior_plays": rate_prior_plays}
        )
    trained = time.perf_counter()
    cur_metrics = evaluate(current, features, catalog, song_ids=hold_ids)
    new_metrics = evaluate(candidate, features, catalog, song_ids=hold_ids)
    cur_s = {t: cur_metrics[t]["spearman"] for t in POPULARITY_TASKS}
    new_s = {t: new_metrics[t]["spearman"] for t in POPULARITY_TASKS}
    ok, why = gate(cur_s, new_s, margin)
    figures: dict[str, Any] = {}
    if ok and judge is not None:
        ok, second, figures = judge(current, candidate)
        why = f"{why}; {second}"
    report = RetrainReport(ok, why, current.version, candidate.version, len(train), len(holdout), cur_s, new_s)
    report.off_policy = figures
    report.timings_s = {"train": round(trained - began, 3), "evaluate": round(time.perf_counter() - trained, 3)}
    if ok:
        _promote(report, candidate, models_root, serving)
    if report.promoted:
        log.info("promoted %s over %s: %s", candidate.version, current.version, report.reason)
    else:
        log.info("kept %s; candidate %s not promoted: %s", current.version, candidate.version, report.reason)
    return report


def _promote(report: RetrainReport, candidate: ScoringModel, models_root: Path, serving: Path | None) -> None:
    """Save ``candidate`` and promote it unless ``current`` no longer names ``serving``: an operator
    promoted (or rolled back) during the run, and their choice stands; the unserved save is removed."""
    existed = (models_root / candidate.version).exists()
    directory = candidate.save_versioned(models_root)
    (directory / RETRAIN_REPORT).write_text(json.dumps(report.to_dict(), indent=2))
    report.model_dir = str(directory)
    try:
        # Records the promotion as owed before ``current`` moves: the window's rescore and the announcement.
        promote_if_serving(models_root, directory, serving, promotion_owed(report))
    except CurrentMoved as moved:
        report.promoted, report.model_dir = False, None
        report.reason = f"{report.reason}; not promoted: {moved} during the run"
        if not existed:  # made by this run and never served
            shutil.rmtree(directory, ignore_errors=True)
