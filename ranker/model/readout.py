"""The like-rate read-out: a ridge-penalised logistic regression from a song's embedding to its like rate.

Why it exists: the feed's prior needs a new song's like rate *per play*. The head's likes output is
trained on like counts, which mix where a song was placed with what listeners thought of it, and
fine-tuning the deep head on the few hundred songs an online retrain sees moves it about at random
(docs/loop-simulation.md measures both). A linear read-out fitted by binomial likelihood on each
song's plays and likes learns the rate directly, weighs a song by how often it was heard, and its
penalty, chosen by cross-validation on held-out likes, keeps it close to the pooled rate when the
evidence is thin.

The read-out is part of a model's card (``like_readout``). A model that carries one reports its
likes score as the percentile of the read-out's like rate among the songs it was fitted on, raised
to the target transform's power (``100 * (pct/100) ** gamma``), so the 0-100 likes score keeps its
meaning (higher means more likes per play), and the model's like-rate curve is the read-out's own
(:meth:`LikeReadout.rate_curve`), so a new song's prior is the rate the read-out predicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Penalties tried by cross-validation, on standardised features (per song: they scale with the songs fitted).
DEFAULT_L2_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
#: Percentiles stored to turn a read-out logit into a likes score.
N_QUANTILES = 101
#: Rows per block when features are centred or scored (bounds the temporary copies).
BLOCK_ROWS = 4096


class ReadoutError(ValueError):
    """The read-out cannot be fitted on this data (too few songs, bad counts)."""


@dataclass(frozen=True)
class LikeReadout:
    """A fitted read-out: ``logit(rate) = intercept + ((x - mean) / scale) @ coef``."""

    mean: FloatArray
    scale: FloatArray
    coef: FloatArray
    intercept: float
    l2: float  # the penalty per song that cross-validation chose
    quantiles: FloatArray  # the fitted songs' logits at percentiles 0, 1, ..., 100
    gamma: float  # the score's power, the target transform's
    n_songs: int
    n_plays: int

    @property
    def dim(self) -> int:
        return int(self.coef.size)

    def logits(self, x: npt.ArrayLike) -> FloatArray:
        """Log-odds of a like per play, one per row of ``x`` (songs x flattened features).

        Computed a block of rows at a time in float64 (``_Design``), so that scoring 100k songs does
        not copy them.
        """
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (batch, {self.dim}), got {arr.shape}")
        return _Design(arr, self.mean, self.scale).logits(np.concatenate(([self.intercept], self.coef)))

    def rates(self, x: npt.ArrayLike) -> FloatArray:
        """The like rate per play each row is expected to get."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.logits(x))), dtype=np.float64)

    def scores(self, x: npt.ArrayLike) -> FloatArray:
        """The 0-100 likes score: the logit's percentile among the fitted songs, to the power gamma."""
        pct = np.interp(self.logits(x), self.quantiles, np.linspace(0.0, 100.0, len(self.quantiles)))
        return np.asarray(100.0 * (pct / 100.0) ** self.gamma, dtype=np.float64)

    def rate_curve(self) -> dict[str, list[float]]:
        """The like-rate curve (likes score -> rate, as ``TargetTransform`` keeps it) that inverts :meth:`scores`.

        A model with a read-out carries it, so the feed's prior of a song is the read-out's rate.
        """
        x = 100.0 * (np.linspace(0.0, 1.0, len(self.quantiles)) ** self.gamma)
        y = 1.0 / (1.0 + np.exp(-self.quantiles))
        return {"x": x.tolist(), "y": np.maximum.accumulate(y).tolist()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "logistic-l2",
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "l2": self.l2,
            "quantiles": self.quantiles.tolist(),
            "gamma": self.gamma,
            "n_songs": self.n_songs,
            "n_plays": self.n_plays,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LikeReadout:
        if data.get("kind") != "logistic-l2":
            raise ValueError(f"unknown like read-out kind {data.get('kind')!r}")
        vectors = [np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef", "quantiles")]
        mean, scale, coef, quantiles = vectors
        if not (mean.ndim == 1 and mean.shape == scale.shape == coef.shape) or quantiles.ndim != 1:
            raise ValueError("like read-out: mean, scale and coef must be vectors of one length")
        if len(quantiles) < 2 or np.any(np.diff(quantiles) < 0) or np.any(scale <= 0):
            raise ValueError("like read-out: quantiles must increase and scales be positive")
        if not all(np.isfinite(v).all() for v in vectors):
            raise ValueError("like read-out: parameters must be finite")
        return cls(
            mean=mean,
            scale=scale,
            coef=coef,
            intercept=float(data["intercept"]),
            l2=float(data["l2"]),
            quantiles=quantiles,
            gamma=float(data["gamma"]),
            n_songs=int(data["n_songs"]),
            n_plays=int(data["n_plays"]),
        )


@dataclass(frozen=True)
class _Design:
    """Raw features, centred in float64 a block at a time, with the scale folded into the weights.

    With ``v = coef / scale``: ``z = intercept + (x - mean) @ v``. No standardised copy of the
    features is made, and centring before the product avoids the cancellation of ``x @ v``
    against ``mean @ v`` when the features sit far from zero.
    """

    x: npt.NDArray[Any]  # float32 when fitting; whatever a caller scores
    mean: FloatArray
    scale: FloatArray

    def rows(self, index: Any) -> _Design:
        return _Design(self.x[index], self.mean, self.scale)

    def _blocks(self) -> Iterator[tuple[int, FloatArray]]:
        """(first row, centred float64 rows) a block at a time: exact sums without a full float64 copy."""
        for start in range(0, len(self.x), BLOCK_ROWS):
            yield start, self.x[start : start + BLOCK_ROWS].astype(np.float64) - self.mean

    def logits(self, w: FloatArray) -> FloatArray:
        v = w[1:] / self.scale
        out = np.empty(len(self.x), dtype=np.float64)
        for start, block in self._blocks():
            out[start : start + len(block)] = block @ v
        return out + w[0]

    def gradient(self, resid: FloatArray) -> FloatArray:
        """d logits / d coef, contracted with ``resid``."""
        total = np.zeros(self.x.shape[1], dtype=np.float64)
        for start, block in self._blocks():
            total += block.T @ resid[start : start + len(block)]
        return total / self.scale


#: Weight of a unit-variance prior on the intercept around the smoothed pooled logit: negligible with
#: real counts, it keeps the intercept finite when no song was liked (or every play was).
INTERCEPT_PRIOR = 1.0


def _pooled_logit(plays: FloatArray, likes: FloatArray) -> float:
    return float(np.log((likes.sum() + 0.5) / (plays.sum() - likes.sum() + 0.5)))


def _nll(
    w: FloatArray, d: _Design, plays: FloatArray, likes: FloatArray, l2: float, centre: float
) -> tuple[float, FloatArray]:
    """Binomial negative log-likelihood plus the penalties, and its gradient; ``w = [intercept, coef]``."""
    z = d.logits(w)
    nll = float(np.sum(plays * np.logaddexp(0.0, z) - likes * z))
    nll += 0.5 * l2 * float(w[1:] @ w[1:]) + 0.5 * INTERCEPT_PRIOR * (w[0] - centre) ** 2
    resid = plays / (1.0 + np.exp(-z)) - likes
    grad0 = resid.sum() + INTERCEPT_PRIOR * (w[0] - centre)
    return nll, np.concatenate(([grad0], d.gradient(resid) + l2 * w[1:]))


def _fit(d: _Design, plays: FloatArray, likes: FloatArray, l2: float) -> FloatArray:
    w0 = np.zeros(d.x.shape[1] + 1)
    w0[0] = centre = _pooled_logit(plays, likes)
    res = minimize(_nll, w0, args=(d, plays, likes, l2, centre), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    if not res.success:
        log.warning("like read-out: the optimiser stopped early (%s); keeping its last weights", res.message)
    return np.asarray(res.x, dtype=np.float64)


def _held_out_nll(w: FloatArray, d: _Design, plays: FloatArray, likes: FloatArray) -> float:
    z = d.logits(w)
    return float(np.sum(plays * np.logaddexp(0.0, z) - likes * z))


def choose_l2(
    d: _Design,
    plays: FloatArray,
    likes: FloatArray,
    grid: Sequence[float],
    *,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """The penalty per song with the lowest held-out binomial deviance over ``folds`` folds of songs."""
    n = len(d.x)
    order = np.random.default_rng(seed).permutation(n)
    parts = [p for p in np.array_split(order, min(folds, n)) if len(p)]
    losses = []
    for l2 in grid:
        total = 0.0
        for part in parts:
            keep = np.ones(n, dtype=bool)
            keep[part] = False
            w = _fit(d.rows(keep), plays[keep], likes[keep], l2 * int(keep.sum()))
            total += _held_out_nll(w, d.rows(part), plays[part], likes[part])
        losses.append(total)
    return float(grid[int(np.argmin(losses))])


def _moments(x: npt.NDArray[np.float32], block: int = BLOCK_ROWS) -> tuple[FloatArray, FloatArray]:
    """Column means and standard deviations in float64, a block of rows at a time (no full copy)."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), block):
        chunk = x[start : start + block].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    mean = total / len(x)
    std = np.sqrt(np.maximum(squares / len(x) - mean * mean, 0.0))
    return mean, np.where(std > 1e-6 * np.maximum(np.abs(mean), 1.0), std, 1.0)


def fit_like_readout(
    features: npt.ArrayLike,
    plays: npt.ArrayLike,
    likes: npt.ArrayLike,
    *,
    gamma: float = 1.0,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 5,
    max_cv_songs: int = 2000,
    seed: int = 0,
) -> LikeReadout:
    """Fit the read-out on songs' flattened features and their play and like counts.

    The penalty is ``l2 * min(n_songs, max_cv_songs)`` with ``l2`` chosen from ``l2_grid`` by
    cross-validation on at most ``max_cv_songs`` songs (so that a 100k-song retrain stays cheap).
    """
    x = np.asarray(features, dtype=np.float32)
    n_plays = np.asarray(plays, dtype=np.float64)
    n_likes = np.asarray(likes, dtype=np.float64)
    if x.ndim != 2 or n_plays.shape != (len(x),) or n_likes.shape != (len(x),):
        raise ReadoutError("features must be (songs, dim) with one play and one like count per song")
    if not (np.isfinite(x).all() and np.isfinite(n_plays).all() and np.isfinite(n_likes).all()):
        raise ReadoutError("features and counts must be finite")
    if np.any(n_plays < 0) or np.any(n_likes < 0) or np.any(n_likes > n_plays):
        raise ReadoutError("counts must satisfy 0 <= likes <= plays")
    if len(x) < 4 or n_plays.sum() <= 0:
        raise ReadoutError(f"a like read-out needs at least 4 songs with plays (got {len(x)})")
    if not l2_grid or min(l2_grid) <= 0:
        raise ReadoutError("l2_grid must hold positive penalties")
    mean, scale = _moments(x)
    d = _Design(x, mean, scale)
    rng = np.random.default_rng(seed)
    cv_rows = np.sort(rng.choice(len(x), size=max_cv_songs, replace=False)) if len(x) > max_cv_songs else slice(None)
    folds = max(2, min(folds, len(x) // 2))
    l2 = choose_l2(d.rows(cv_rows), n_plays[cv_rows], n_likes[cv_rows], l2_grid, folds=folds, seed=seed)
    # The penalty cross-validation judged, for as many songs as it saw: a prior's strength does not
    # grow with the data, so beyond max_cv_songs it is not scaled up (that would flatten the rates).
    w = _fit(d, n_plays, n_likes, l2 * min(len(x), max_cv_songs))
    logits = d.logits(w)
    return LikeReadout(
        mean=mean,
        scale=scale,
        coef=w[1:],
        intercept=float(w[0]),
        l2=l2,
        quantiles=np.percentile(logits, np.linspace(0.0, 100.0, N_QUANTILES)),
        gamma=float(gamma),
        n_songs=len(x),
        n_plays=int(n_plays.sum()),
    )
