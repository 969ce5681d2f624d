"""Pairwise human preferences (battles): does a head's score difference predict the preferred song?

Music Arena-like battles: a file of ``song_a``, ``song_b``, ``preference`` in
{a, b, tie, both_bad}. Only decided battles (a or b) count. The paper's out-of-distribution
protocol (public notebook): simple rules on score differences (sign of the likes difference,
of the streams difference, of the mean aesthetic difference, ...), the ROC AUC of those
differences, and a logistic regression on the popularity-score differences with 10-fold
stratified cross-validation (standardised features, L2, seed 42) — here once with and once
without the aesthetic-score differences, the comparison the paper reports but whose table
is not public. The logistic regression is implemented on numpy + scipy (no scikit-learn).

A module of its own because it is a second, independent protocol beside the per-task song
metrics of :mod:`ranker.model.evaluate`: its own input file, statistics and report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ranker.catalog import CatalogError
from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS
from ranker.model.evaluate import FloatArray, _check_encoder, _describe_rows, _rank, predict_songs
from ranker.model.report import _fmt, json_safe

if TYPE_CHECKING:
    from rich.table import Table

    from ranker.features import FeatureSet
    from ranker.model.artifact import ScoringModel

PREFERENCES: tuple[str, ...] = ("a", "b", "tie", "both_bad")


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
