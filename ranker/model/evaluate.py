"""Measuring a head: per-task song-level metrics, and pairwise human preferences (battles).

Song level, as in the paper: Pearson, Spearman, MAE and MSE per task between the catalog's
truth and the head's scores. Popularity truth is the catalog's raw counts mapped through the
*model's own* saved target transform (percentiles of its training split), so a head is judged
on the scale it was trained for; a model without one (the released checkpoint, an untrained
head) gets a transform fitted on the evaluated catalog itself, and the report says so.

Battles (Music Arena-like): a file of ``song_a``, ``song_b``, ``preference`` in
{a, b, tie, both_bad}. Only decided battles (a or b) count. The paper's out-of-distribution
protocol (public notebook): simple rules on score differences (sign of the likes difference,
of the streams difference, of the mean aesthetic difference, ...), the ROC AUC of those
differences, and a logistic regression on the popularity-score differences with 10-fold
stratified cross-validation (standardised features, L2, seed 42) — here once with and once
without the aesthetic-score differences, the comparison the paper reports but whose table
is not public. The logistic regression is implemented on numpy + scipy (no scikit-learn).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ranker.catalog import Catalog, CatalogError, read_catalog
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, TASKS

if TYPE_CHECKING:
    from rich.table import Table

    from ranker.features import FeatureSet
    from ranker.model.artifact import ScoringModel
    from ranker.model.targets import TargetTransform

METRICS: tuple[str, ...] = ("pearson", "spearman", "mae", "mse")
PREFERENCES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
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


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def metrics_table(metrics: Mapping[str, Mapping[str, float]], *, title: str = "APEX evaluation") -> Table:
    """A rich table: one row per task, one column per metric."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task")
    for m in METRICS:
        table.add_column(m, justify="right")
    for task in [t for t in TASKS if t in metrics] + [t for t in metrics if t not in TASKS]:
        row = metrics[task]
        table.add_row(task, *(_fmt(row.get(m, math.nan)) for m in METRICS))
    return table


def print_metrics(metrics: Mapping[str, Mapping[str, float]], *, title: str = "APEX evaluation") -> None:
    from rich.console import Console

    Console().print(metrics_table(metrics, title=title))


def _fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def json_safe(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN -> null), atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


# --------------------------------------------------------------------------------------
# Battles
# --------------------------------------------------------------------------------------


class BattleError(CatalogError):
    """The battles file cannot be used; the message names the rows."""


@dataclass(frozen=True)
class Battles:
    song_a: list[str]
    song_b: list[str]
    preference: list[str]
    path: Path

    def __len__(self) -> int:
        return len(self.song_a)


_PREFERENCE_ALIASES = {
    "a": "a",
    "model_a": "a",
    "b": "b",
    "model_b": "b",
    "tie": "tie",
    "both_bad": "both_bad",
    "both-bad": "both_bad",
    "bothbad": "both_bad",
    "both bad": "both_bad",
}


def read_battles(path: str | Path) -> Battles:
    """Read a CSV or Parquet battles file (``song_a``, ``song_b``, ``preference``), validated."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise BattleError(f"battles file {p} does not exist")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(p)
        elif p.suffix.lower() in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in ("song_a", "song_b", "preference")})
            table = pacsv.read_csv(p, parse_options=opts, convert_options=conv)
        else:
            raise BattleError(f"battles file {p}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as exc:
        raise BattleError(f"battles file {p} cannot be read: {exc}") from exc
    missing = [c for c in ("song_a", "song_b", "preference") if c not in table.column_names]
    if missing:
        raise BattleError(f"battles file {p} lacks columns: {', '.join(missing)}")
    a = ["" if x is None else str(x) for x in table.column("song_a").to_pylist()]
    b = ["" if x is None else str(x) for x in table.column("song_b").to_pylist()]
    raw = ["" if x is None else str(x).strip().lower() for x in table.column("preference").to_pylist()]
    prefs = [_PREFERENCE_ALIASES.get(x, "") for x in raw]
    bad = [i for i, x in enumerate(prefs) if not x]
    if bad:
        raise BattleError(
            f"battles file {p}: preference must be one of {list(PREFERENCES)} at {_describe_rows(bad)} "
            f"(got e.g. {raw[bad[0]]!r})"
        )
    empty = [i for i in range(len(a)) if not a[i] or not b[i]]
    if empty:
        raise BattleError(f"battles file {p}: song_a or song_b is empty at {_describe_rows(empty)}")
    same = [i for i in range(len(a)) if a[i] == b[i]]
    if same:
        raise BattleError(f"battles file {p}: song_a equals song_b at {_describe_rows(same)}")
    return Battles(song_a=a, song_b=b, preference=prefs, path=p)


def roc_auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class only."""
    yy = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(yy.sum()), int((~yy).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _rank(s)
    return float((ranks[yy].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _sign_accuracy(y: np.ndarray, diff: np.ndarray) -> float:
    """Share of battles whose winner has the larger score; equal scores count as a coin flip."""
    right = np.where(diff > 0, y, np.where(diff < 0, ~y, False)).astype(np.float64)
    right[diff == 0] = 0.5
    return float(right.mean())


def fit_logistic(x: FloatArray, y: np.ndarray, *, c: float = 1.0) -> tuple[FloatArray, float]:
    """L2-regularised logistic regression (penalty ``|w|^2 / (2C)``, intercept free) by L-BFGS."""
    from scipy.optimize import minimize

    d = x.shape[1]
    yy = y.astype(np.float64)

    def loss(theta: FloatArray) -> tuple[float, FloatArray]:
        w, b = theta[:d], theta[d]
        z = x @ w + b
        # log(1 + e^z) - y z, computed stably
        nll = float(np.sum(np.logaddexp(0.0, z) - yy * z))
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        g = p - yy
        grad = np.concatenate([x.T @ g + w / c, [g.sum()]])
        return nll + float(w @ w) / (2.0 * c), grad

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B")
    return np.asarray(res.x[:d], dtype=np.float64), float(res.x[d])


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` test folds with each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in (False, True):
        members = np.flatnonzero(y == cls)
        rng.shuffle(members)
        for i, m in enumerate(members):
            folds[(i + offset) % k].append(int(m))
        offset += len(members)
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def cross_validated_logistic(
    x: FloatArray, y: np.ndarray, *, folds: int = 10, seed: int = 42, c: float = 1.0
) -> dict[str, float]:
    """Out-of-fold ROC AUC and accuracy of a logistic regression, standardised within each fold."""
    k = min(folds, int(y.sum()), int((~y).sum()))
    if k < 2:
        return {"auc": math.nan, "accuracy": math.nan, "folds": float(k)}
    proba = np.empty(len(y))
    for test in stratified_folds(y, k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        mu = x[train].mean(axis=0)
        sd = x[train].std(axis=0)
        sd[sd == 0] = 1.0
        w, b = fit_logistic((x[train] - mu) / sd, y[train], c=c)
        z = ((x[test] - mu) / sd) @ w + b
        proba[test] = 0.5 * (1.0 + np.tanh(0.5 * z))
    return {
        "auc": roc_auc(y, proba),
        "accuracy": float(((proba > 0.5) == y).mean()),
        "folds": float(k),
    }


@dataclass
class BattleReport:
    """Preference prediction from score differences (a minus b) on decided battles."""

    n_battles: int
    n_decided: int
    outcomes: dict[str, int]
    rules: dict[str, dict[str, float]]
    logistic: dict[str, dict[str, float]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "n_battles": self.n_battles,
                "n_decided": self.n_decided,
                "outcomes": self.outcomes,
                "rules": self.rules,
                "logistic": self.logistic,
                "notes": self.notes,
            }
        )

    def table(self) -> Table:
        from rich.table import Table

        table = Table(title=f"battles: {self.n_decided} decided of {self.n_battles}")
        for col in ("predictor", "accuracy", "roc_auc"):
            table.add_column(col, justify="left" if col == "predictor" else "right")
        for name, row in self.rules.items():
            table.add_row(f"rule: {name}", _fmt(row["accuracy"]), _fmt(row["auc"]))
        for name, row in self.logistic.items():
            table.add_row(f"logistic CV: {name}", _fmt(row["accuracy"]), _fmt(row["auc"]))
        return table


def evaluate_battles(
    model: ScoringModel,
    features: FeatureSet,
    battles: Battles | str | Path,
    *,
    folds: int = 10,
    seed: int = 42,
    c: float = 1.0,
    input_mode: str | None = None,
) -> BattleReport:
    """Score both songs of every battle and predict the preferred one (see the module doc)."""
    b = battles if isinstance(battles, Battles) else read_battles(battles)
    _check_encoder(model, features)
    index = features.index()
    unknown = [i for i in range(len(b)) if b.song_a[i] not in index or b.song_b[i] not in index]
    if unknown:
        i = unknown[0]
        missing = b.song_a[i] if b.song_a[i] not in index else b.song_b[i]
        raise BattleError(
            f"battles file {b.path}: no features for the songs of {_describe_rows(unknown)} "
            f"(e.g. {missing!r}); embed a catalog of the battle songs first"
        )
    outcomes = {p: int(sum(1 for x in b.preference if x == p)) for p in PREFERENCES}
    decided = np.array([p in ("a", "b") for p in b.preference])
    notes: list[str] = []
    rows = np.flatnonzero(decided)
    y = np.array([b.preference[i] == "a" for i in rows], dtype=bool)
    if len(rows) == 0:
        return BattleReport(len(b), 0, outcomes, {}, {}, ["no decided battles (all tie or both_bad)"])
    songs = sorted({b.song_a[i] for i in rows} | {b.song_b[i] for i in rows})
    song_rows = np.array([index[s] for s in songs], dtype=np.int64)
    scores = predict_songs(model, features, song_rows, input_mode=input_mode).astype(np.float64)
    pos = {s: k for k, s in enumerate(songs)}
    ia = np.array([pos[b.song_a[i]] for i in rows])
    ib = np.array([pos[b.song_b[i]] for i in rows])
    tasks = list(model.tasks)
    diff = {t: scores[ia, j] - scores[ib, j] for j, t in enumerate(tasks)}

    predictors: dict[str, np.ndarray] = {}
    for t in POPULARITY_TASKS:
        if t in diff:
            predictors[t] = diff[t]
    pop = [t for t in POPULARITY_TASKS if t in diff]
    aes = [t for t in AESTHETIC_TASKS if t in diff]
    if len(pop) == 2:
        predictors["popularity_mean"] = np.mean([diff[t] for t in pop], axis=0)
    if aes:
        predictors["aesthetic_mean"] = np.mean([diff[t] for t in aes], axis=0)
        for t in aes:
            predictors[t] = diff[t]
    if len(diff) > 1:
        # The notebook's "equal-weight combined": z-score every difference, then add them up.
        z = [(d - d.mean()) / d.std() if d.std() > 0 else d * 0 for d in diff.values()]
        predictors["all_z_sum"] = np.sum(z, axis=0)
    rules = {
        name: {"accuracy": _sign_accuracy(y, d), "auc": roc_auc(y, d), "n": float(len(y))}
        for name, d in predictors.items()
    }
    logistic: dict[str, dict[str, float]] = {}
    if pop:
        x_pop = np.stack([diff[t] for t in pop], axis=1)
        logistic["popularity"] = cross_validated_logistic(x_pop, y, folds=folds, seed=seed, c=c)
        if aes:
            x_all = np.stack([diff[t] for t in pop + aes], axis=1)
            logistic["popularity+aesthetics"] = cross_validated_logistic(x_all, y, folds=folds, seed=seed, c=c)
        else:
            notes.append("the model has no aesthetic outputs: no popularity+aesthetics comparison")
    if len(rows) < 2 * folds:
        notes.append(f"only {len(rows)} decided battles: cross-validation used fewer folds")
    return BattleReport(len(b), len(rows), outcomes, rules, logistic, notes)
