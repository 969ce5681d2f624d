"""The APEX head: pooled MERT layer features in, seven scores out.

Architecture as in the APEX paper (Herremans & Husain, 2026) and its public
code: a shared trunk of ``Linear + BatchNorm1d + GELU + Dropout`` blocks
(768 -> 512 -> 256, or 512 -> 384 -> 256 at depth 3), one branch per task
(256 -> 128 -> 64 with the same block, then ``Linear(64, 1)``), popularity
outputs ``sigmoid * 100`` and aesthetic outputs ``sigmoid * 4 + 1``.

One deliberate difference: the paper mixes the four pooled layers with a
``Conv1d(4 -> 1)`` that is created after seeding and never trained (a fixed
random mix). Here the mix belongs to the head and is learned; ``softmax``
(convex weights over the layers, starting as the plain mean) is the default,
``conv1x1`` keeps the paper's form and ``mean`` has no parameters.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, TASKS

LayerMix = Literal["softmax", "conv1x1", "mean"]
LossMode = Literal["uncertainty", "equal", "weighted"]

#: The paper's shared trunks by depth (the ablation's "shared" factor).
SHARED_DIMS_BY_DEPTH: dict[int, tuple[int, ...]] = {2: (512, 256), 3: (512, 384, 256)}

#: The paper's fixed loss weights: popularity counts five times each aesthetic.
DEFAULT_TASK_WEIGHTS: dict[str, float] = {t: (5.0 if t in POPULARITY_TASKS else 1.0) for t in TASKS}

#: Output range per task family: ``sigmoid * scale + shift``.
POPULARITY_RANGE: tuple[float, float] = (0.0, 100.0)
AESTHETIC_RANGE: tuple[float, float] = (1.0, 5.0)


def task_range(task: str) -> tuple[float, float]:
    """The (low, high) range a task's score lives in."""
    if task in POPULARITY_TASKS:
        return POPULARITY_RANGE
    if task in AESTHETIC_TASKS:
        return AESTHETIC_RANGE
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


class HeadConfig(BaseModel):
    """Everything needed to rebuild an :class:`ApexHead` (stored in a model's config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_dim: int = Field(gt=0, description="Feature size per layer (768 MERT-95M, 1024 MERT-330M).")
    n_layers: int = Field(4, gt=0, description="Pooled encoder layers per song.")
    tasks: tuple[str, ...] = Field(TASKS, description="Output tasks, a subset of TASKS in TASKS order.")
    shared_dims: tuple[int, ...] = Field(SHARED_DIMS_BY_DEPTH[2], min_length=1)
    branch_dims: tuple[int, ...] = (128, 64)
    shared_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    branch_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_mix: LayerMix = "softmax"
    input_norm: bool = Field(
        False,
        description="Standardise each pooled (layer, feature) by statistics of the training songs, kept with "
        "the weights. Not in the paper (MERT features are near unit scale); the logmel baseline's are not.",
    )
    loss: LossMode = "uncertainty"
    task_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS),
        description="Per-task weights for loss='weighted'; tasks not named weigh 1.",
    )

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if not tasks:
            raise ValueError("tasks must name at least one task")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known tasks: {list(TASKS)}")
        canonical = tuple(t for t in TASKS if t in tasks)
        if tuple(tasks) != canonical:
            # One fixed order keeps output columns meaning the same thing everywhere.
            raise ValueError(f"tasks must be unique and in the order of TASKS: use {list(canonical)}")
        return tuple(tasks)

    @field_validator("shared_dims", "branch_dims")
    @classmethod
    def _check_dims(cls, dims: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in dims):
            raise ValueError(f"layer sizes must be positive, got {list(dims)}")
        return dims

    @field_validator("task_weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = [t for t in weights if t not in TASKS]
        if unknown:
            raise ValueError(f"task_weights names unknown tasks {unknown}; known tasks: {list(TASKS)}")
        negative = {t: w for t, w in weights.items() if not (math.isfinite(w) and w >= 0.0)}
        if negative:
            raise ValueError(f"task_weights must be finite and >= 0, got {negative}")
        return weights

    @model_validator(mode="after")
    def _check_weighted_loss(self) -> HeadConfig:
        if self.loss == "weighted" and sum(self.weight(t) for t in self.tasks) <= 0:
            raise ValueError("loss='weighted' needs a positive weight for at least one task")
        return self

    def weight(self, task: str) -> float:
        """The fixed loss weight of a task (used by loss='weighted')."""
        return float(self.task_weights.get(task, 1.0))

    @property
    def shared_depth(self) -> int:
        return len(self.shared_dims)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


def _block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """The paper's block: Linear + BatchNorm1d + GELU + Dropout."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.GELU(), nn.Dropout(dropout))


class LayerMixer(nn.Module):
    """Combines (B, L, D) pooled layers into (B, D)."""

    def __init__(self, mode: LayerMix, n_layers: int) -> None:
        super().__init__()
        self.mode = mode
        self.logits: nn.Parameter | None = None
        self.conv: nn.Conv1d | None = None
        if mode == "softmax":
            # Zero logits: training starts from the plain mean of the layers.
            self.logits = nn.Parameter(torch.zeros(n_layers))
        elif mode == "conv1x1":
            # The paper's form: layers are the channels, the feature axis is the length.
            self.conv = nn.Conv1d(n_layers, 1, kernel_size=1)
        elif mode != "mean":
            raise ValueError(f"unknown layer_mix {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.logits is not None:
            return torch.einsum("bld,l->bd", x, torch.softmax(self.logits, dim=0))
        if self.conv is not None:
            out: torch.Tensor = self.conv(x).squeeze(1)
            return out
        return x.mean(dim=1)

    def weights(self) -> torch.Tensor | None:
        """The current per-layer weights (softmax and conv1x1), for inspection."""
        if self.logits is not None:
            return torch.softmax(self.logits.detach(), dim=0)
        if self.conv is not None:
            return self.conv.weight.detach().reshape(-1)
        return None


class ApexHead(nn.Module):
    """The APEX multi-task head: ``forward((B, L, D)) -> (B, T)`` scores on each task's scale."""

    out_shift: torch.Tensor
    out_scale: torch.Tensor
    in_mean: torch.Tensor
    in_std: torch.Tensor

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.tasks: tuple[str, ...] = config.tasks
        self.mix = LayerMixer(config.layer_mix, config.n_layers)
        if config.input_norm:  # identity until set_input_stats; saved with the weights
            self.register_buffer("in_mean", torch.zeros(config.n_layers, config.input_dim))
            self.register_buffer("in_std", torch.ones(config.n_layers, config.input_dim))

        dims = (config.input_dim, *config.shared_dims)
        self.trunk = nn.Sequential(*(_block(a, b, config.shared_dropout) for a, b in pairwise(dims)))
        bdims = (dims[-1], *config.branch_dims)
        self.branches = nn.ModuleDict(
            {
                task: nn.Sequential(
                    *(_block(a, b, config.branch_dropout) for a, b in pairwise(bdims)),
                    nn.Linear(bdims[-1], 1),
                )
                for task in config.tasks
            }
        )
        # Uncertainty weighting (Kendall et al.): one learned log-sigma per task.
        # Kept for every loss mode so a model's tensors do not depend on how it was trained.
        self.log_sigma = nn.Parameter(torch.zeros(len(config.tasks)))

        ranges = [task_range(t) for t in config.tasks]
        self.register_buffer("out_shift", torch.tensor([lo for lo, _ in ranges]), persistent=False)
        self.register_buffer("out_scale", torch.tensor([hi - lo for lo, hi in ranges]), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores of shape (B, T): popularity in [0, 100], aesthetics in [1, 5]."""
        return torch.sigmoid(self.logits(features)) * self.out_scale + self.out_shift

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid outputs (B, T)."""
        cfg = self.config
        if features.dim() != 3 or features.shape[1] != cfg.n_layers or features.shape[2] != cfg.input_dim:
            raise ValueError(
                f"expected features of shape (batch, {cfg.n_layers}, {cfg.input_dim}), got {tuple(features.shape)}"
            )
        if cfg.input_norm:
            features = (features - self.in_mean) / self.in_std
        shared = self.trunk(self.mix(features))
        return torch.cat([self.branches[t](shared) for t in self.tasks], dim=1)

    def set_input_stats(self, features: torch.Tensor) -> None:
        """Fit the input standardisation on training rows (B, L, D); a constant feature keeps scale 1."""
        if not self.config.input_norm:
            raise ValueError("this head was built without input_norm")
        x = features.detach().to(self.in_mean.device, torch.float32)
        std = x.std(dim=0, unbiased=False)
        with torch.no_grad():
            self.in_mean.copy_(x.mean(dim=0))
            self.in_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    # Loss --------------------------------------------------------------------------
    def task_mse(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task MSE over the known targets, and how many there were: two (T,) tensors.

        A target is known where ``mask`` is true (default: where it is not NaN); a task with
        no known target in the batch gets MSE 0 and count 0. MSE is on the output scale,
        as in the paper (so popularity errors are in points out of 100).
        """
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != len(self.tasks):
            raise ValueError(
                f"pred and target must both be (batch, {len(self.tasks)}), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        known = ~torch.isnan(target)
        if mask is not None:
            if mask.shape != target.shape:
                raise ValueError(f"mask must be {tuple(target.shape)}, got {tuple(mask.shape)}")
            known = known & mask.to(torch.bool)
        # Zero the unknown targets before subtracting so NaN never reaches the gradient.
        safe_target = torch.where(known, target, torch.zeros_like(target))
        weight = known.to(pred.dtype)
        sq = (pred - safe_target).pow(2) * weight
        counts = weight.sum(dim=0)
        mse = sq.sum(dim=0) / counts.clamp(min=1.0)
        return mse, counts

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (a scalar) under ``config.loss``; NaN or masked-out targets are ignored.

        - ``equal``: sum of per-task MSE;
        - ``weighted``: sum of ``task_weights[t] * MSE_t`` (paper: 5 for popularity, 1 otherwise);
        - ``uncertainty``: sum of ``MSE_t / (2 sigma_t^2) + log sigma_t``.

        Tasks without a known target in the batch add nothing (not even their log-sigma term,
        which alone would drive sigma towards zero).
        """
        mse, counts = self.task_mse(pred, target, mask)
        present = (counts > 0).to(mse.dtype)
        mode = self.config.loss
        if mode == "equal":
            per_task = mse
        elif mode == "weighted":
            weights = torch.tensor([self.config.weight(t) for t in self.tasks], dtype=mse.dtype)
            per_task = mse * weights.to(mse.device)
        elif mode == "uncertainty":
            log_sigma = self.log_sigma.to(mse.dtype)
            per_task = mse * 0.5 * torch.exp(-2.0 * log_sigma) + log_sigma
        else:  # pragma: no cover - HeadConfig forbids it
            raise ValueError(f"unknown loss mode {mode!r}")
        # pred.sum() * 0 keeps a graph (and a zero gradient) when no target is known at all.
        return (per_task * present).sum() + pred.sum() * 0.0

    def loss_weights(self) -> dict[str, float]:
        """The weight each task's MSE currently gets (uncertainty: 1 / (2 sigma^2)), for logging."""
        mode = self.config.loss
        if mode == "equal":
            return dict.fromkeys(self.tasks, 1.0)
        if mode == "weighted":
            return {t: self.config.weight(t) for t in self.tasks}
        w = 0.5 * torch.exp(-2.0 * self.log_sigma.detach())
        return {t: float(v) for t, v in zip(self.tasks, w.tolist(), strict=True)}
