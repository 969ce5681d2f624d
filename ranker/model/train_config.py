"""What decides a training run of the APEX head (:class:`TrainConfig`, stored in the model card),
what it gives back (:class:`TrainResult`), and how it fails (:class:`TrainingError`).

Kept apart from the training loop (:mod:`ranker.model.train`) so that callers that only build or
read a configuration do not need the loop's imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ranker.events import POPULARITY_TASKS, TASKS
from ranker.model.artifact import ScoringModel
from ranker.model.head import SHARED_DIMS_BY_DEPTH, HeadConfig, LayerMix, LossMode
from ranker.model.targets import DEFAULT_GAMMA, DEFAULT_MIN_COHORT_SIZE, CohortMode

TaskSet = Literal["popularity", "full"]
InputMode = Literal["song", "segment"]
TASK_SETS: dict[str, tuple[str, ...]] = {"popularity": POPULARITY_TASKS, "full": TASKS}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where and what to try."""


class TrainConfig(BaseModel):
    """Everything that decides a training run (stored in the model card, so it is reproducible)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_mode: InputMode = Field("song", description="song: pooled song features; segment: per segment.")
    tasks: TaskSet = Field("full", description="popularity: streams+likes; full: + 5 aesthetics.")
    loss: LossMode = "uncertainty"
    shared_depth: Literal[2, 3] = 2
    layer_mix: LayerMix = Field("softmax", description="softmax (learned convex weights) is our default.")
    train_layer_mix: bool = Field(True, description="False keeps the mix at its start (paper: fixed).")
    standardize: bool = Field(
        True,
        description="Standardise the head's inputs by the training songs' statistics (HeadConfig.input_norm; "
        "not in the paper). A warm start keeps the starting model's choice.",
    )
    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(512, ge=2)
    grad_clip: float | None = Field(1.0, gt=0)
    patience: int = Field(20, ge=1)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    holdout_generators: tuple[str, ...] = Field(
        (), description="Validate on these generators' songs (train on the others)."
    )
    seed: int = 42
    ensemble: int = Field(1, ge=1, le=32, description="Heads in the deep ensemble, seeded seed, seed+1, ...")
    ood: bool = Field(True, description="Fit the out-of-distribution distance on the training songs.")
    gamma: float = Field(DEFAULT_GAMMA, gt=0, description="Power of the percentile -> score transform.")
    cohort: CohortMode = "all"
    min_cohort_size: int = Field(DEFAULT_MIN_COHORT_SIZE, ge=1)
    shuffle_targets: bool = Field(False, description="Null baseline: permute targets across train songs.")
    stop_on: Literal["val_loss", "val_scaled_mse"] = Field(
        "val_loss",
        description="Early-stopping criterion: the training loss on validation songs (paper), or the "
        "sum over tasks of validation MSE / training-target variance (the same yardstick for every "
        "loss mode: the uncertainty loss's log-sigma terms keep falling while the predictions stall).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on the CPU.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads while training; None: one for small batches, else torch's."
    )

    @field_validator("holdout_generators")
    @classmethod
    def _unique(cls, gens: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for g in gens if g))

    @property
    def task_names(self) -> tuple[str, ...]:
        return TASK_SETS[self.tasks]

    def head_config(self, input_dim: int, n_layers: int) -> HeadConfig:
        return HeadConfig(
            input_dim=input_dim,
            n_layers=n_layers,
            tasks=self.task_names,
            shared_dims=SHARED_DIMS_BY_DEPTH[self.shared_depth],
            layer_mix=self.layer_mix,
            input_norm=self.standardize,
            loss=self.loss,
        )

    def card_dict(self) -> dict[str, Any]:
        """The fields that decide the weights (device and precision switches left out)."""
        return self.model_dump(mode="json", exclude={"device", "amp", "threads"})

    def cpu_threads(self, input_size: int) -> int:
        """Threads for the CPU loop.

        Small batches (under 64k input values) run faster on one thread, and a second thread
        on a busy 2-core machine can make every step 20-50x slower (OpenMP barriers spin while
        the other core is taken), so the default keeps them single-threaded.
        """
        if self.threads is not None:
            return self.threads
        return 1 if self.batch_size * input_size < 65_536 else torch.get_num_threads()


@dataclass
class TrainResult:
    """A trained model and how it got there."""

    model: ScoringModel
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    train_song_ids: list[str]
    val_song_ids: list[str]
    skipped_failed: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    train_s: float = 0.0
    rows_per_epoch: int = 0

    @property
    def rows_per_s(self) -> float:
        """Training throughput: rows (songs or segments) per second, validation included."""
        return self.rows_per_epoch * self.epochs_run / self.train_s if self.train_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "n_train": len(self.train_song_ids),
            "n_val": len(self.val_song_ids),
            "skipped_failed": len(self.skipped_failed),
            "elapsed_s": round(self.elapsed_s, 3),
            "train_s": round(self.train_s, 3),
            "rows_per_epoch": self.rows_per_epoch,
            "rows_per_s": round(self.rows_per_s, 1),
        }
