"""How far a song lies from the songs a head was trained on: a distance and its percentile.

A song from a generator the head never saw can get confident scores that mean nothing. The
distance here flags it: a Mahalanobis distance of the head's inputs (the pooled layers,
flattened) to the training songs, in the probabilistic-PCA form, so that it stays cheap at
MERT's 4 x 768 inputs:

- the inputs are centred on the training mean and projected on the top ``k`` principal
  directions (``k`` <= 64); the covariance there is shrunk towards a multiple of the
  identity by the Ledoit-Wolf rule (a few hundred songs cannot pin 64 variances down);
- what the projection leaves out counts too, at the mean variance of the discarded
  directions (without it a song far away *across* the training subspace would look near);
- the distance is the square root of the two squared terms' sum, divided by the dimension
  so that its scale does not depend on the encoder.

The distance is calibrated on training songs the fit did not see: the percentile of a song
is the share (0-100) of those held-out distances at or below its own, so 50 is a typical
training song and 100 is further than every held-out one. The flag threshold is a setting
(``model.ood_flag_percentile``), not part of the model.

Cost per song: one (D x k) matrix product and a norm; on the CPU about 10 us a song for
MERT-sized inputs in batches (benchmarks/uncertainty_cost.py prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

#: The safetensors keys of the OOD model inside a model's weights file.
PREFIX = "ood."
MAX_COMPONENTS = 64
#: Share of the training songs held out to calibrate the percentile.
CALIBRATION_FRACTION = 0.2
MIN_SONGS = 8

FloatArray = npt.NDArray[np.float64]


def ledoit_wolf(z: FloatArray) -> tuple[FloatArray, float]:
    """The Ledoit-Wolf shrunk covariance of centred rows ``z`` (n, k) and its shrinkage (0-1)."""
    n, k = z.shape
    s = z.T @ z / n
    mu = float(np.trace(s)) / k
    delta = float(((s - mu * np.eye(k)) ** 2).sum()) / k
    if delta <= 0:
        return s, 0.0
    # beta: how noisy the sample covariance is, from the spread of the per-row outer products.
    sq = z**2
    beta = float((sq.T @ sq).sum() / n - (s**2).sum()) / (k * n)
    shrink = min(max(beta, 0.0), delta) / delta
    return shrink * mu * np.eye(k) + (1.0 - shrink) * s, shrink


@dataclass(frozen=True)
class OodModel:
    """A fitted distance to the training songs and its calibration (sorted held-out distances)."""

    mean: npt.NDArray[np.float32]  # (D,)
    components: npt.NDArray[np.float32]  # (D, k): principal directions, whitened by the shrunk covariance
    residual_var: float  # variance per discarded direction
    calibration: npt.NDArray[np.float32]  # sorted distances of the held-out training songs

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Distances of songs ``x`` (B, ...) flattened to (B, D)."""
        a = np.asarray(x, dtype=np.float32)
        v = a.reshape(len(a), int(np.prod(a.shape[1:])))
        if v.shape[1] != self.dim:
            raise ValueError(f"the OOD model takes {self.dim} features per song, got {v.shape[1]}")
        c = v - self.mean
        proj = c @ self.components  # whitened coordinates
        # The residual: |c|^2 minus the part inside the subspace (the basis is orthonormal before whitening).
        total = np.einsum("ij,ij->i", c, c, dtype=np.float64)
        inner = c @ self.basis
        inside = np.einsum("ij,ij->i", inner, inner, dtype=np.float64)
        resid = np.maximum(total - inside, 0.0) / max(self.residual_var, 1e-12)
        d2 = np.einsum("ij,ij->i", proj, proj, dtype=np.float64) + resid
        return np.sqrt(d2 / self.dim)

    @property
    def basis(self) -> npt.NDArray[np.float32]:
        """The orthonormal principal directions (D, k) (the components before whitening)."""
        cols = np.linalg.norm(self.components, axis=0, keepdims=True)
        return (self.components / np.maximum(cols, 1e-30)).astype(np.float32)

    def percentile(self, distance: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Share (0-100) of the held-out training distances at or below each distance: monotone."""
        d = np.asarray(distance, dtype=np.float64)
        below = np.searchsorted(self.calibration.astype(np.float64), d, side="right")
        return 100.0 * below / len(self.calibration)

    def score(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The OOD percentile of songs ``x``."""
        return self.percentile(self.distance(x))

    # Persistence: tensors in the model's weights file (so they are hashed into its version) --
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{PREFIX}mean": torch.from_numpy(np.ascontiguousarray(self.mean)),
            f"{PREFIX}components": torch.from_numpy(np.ascontiguousarray(self.components)),
            f"{PREFIX}residual_var": torch.tensor([self.residual_var], dtype=torch.float64),
            f"{PREFIX}calibration": torch.from_numpy(np.ascontiguousarray(self.calibration)),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> OodModel:
        """The model from :meth:`tensors`' output; ``KeyError``/``ValueError`` when it is malformed."""
        mean = tensors[f"{PREFIX}mean"].numpy().astype(np.float32)
        comps = tensors[f"{PREFIX}components"].numpy().astype(np.float32)
        cal = tensors[f"{PREFIX}calibration"].numpy().astype(np.float32)
        if comps.ndim != 2 or comps.shape[0] != mean.shape[0] or cal.ndim != 1 or not len(cal):
            raise ValueError("OOD tensors of inconsistent shapes")
        return cls(mean, comps, float(tensors[f"{PREFIX}residual_var"].reshape(-1)[0]), np.sort(cal))


def fit_ood(x: npt.ArrayLike, *, seed: int = 0, max_components: int = MAX_COMPONENTS) -> OodModel:
    """Fit on training songs ``x`` (N, ...): the distance on a seeded 80 %, the percentiles on the rest."""
    a = np.asarray(x, dtype=np.float64)
    v = a.reshape(len(a), int(np.prod(a.shape[1:])))
    n, dim = v.shape
    if n < MIN_SONGS:
        raise ValueError(f"an OOD model needs at least {MIN_SONGS} training songs, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = max(2, round(CALIBRATION_FRACTION * n))
    fit_rows, cal_rows = perm[n_cal:], perm[:n_cal]
    fit = v[fit_rows]
    mean = fit.mean(axis=0)
    c = fit - mean
    k = max(1, min(max_components, len(fit) - 1, dim))
    _, sing, vt = np.linalg.svd(c, full_matrices=False)
    basis = vt[:k].T  # (D, k)
    cov, _ = ledoit_wolf(c @ basis)
    evals, evecs = np.linalg.eigh(cov)
    # Whitening inside the subspace: W = basis @ evecs / sqrt(evals); columns stay orthogonal.
    whiten = basis @ evecs / np.sqrt(np.maximum(evals, 1e-12))
    rest = (sing[k:] ** 2).sum() / len(fit)
    residual_var = float(rest / max(dim - k, 1)) if dim > k else 1.0
    # Fewer songs than dimensions leave the discarded variance unmeasured (near 0): floor it at the
    # smallest kept (shrunk) variance, or every song off the sample's subspace would be infinitely far.
    residual_var = max(residual_var, float(evals.min()))
    # Components stored whitened; their directions (the basis, rotated) are recovered by normalising.
    empty = np.zeros(1, np.float32)
    model = OodModel(mean.astype(np.float32), whiten.astype(np.float32), max(residual_var, 1e-12), empty)
    cal = np.sort(model.distance(v[cal_rows])).astype(np.float32)
    return OodModel(model.mean, model.components, model.residual_var, cal)
