"""Model directories: how a trained (or seeded) APEX head is stored, loaded and scored with.

A model directory holds

- ``model.safetensors``: the head's tensors (safetensors only: a model file can never run code);
  a deep ensemble's members as ``member<i>.<name>`` (a single head keeps the plain names, so
  models saved before ensembles existed load and hash as before), and the out-of-distribution
  model, if any, as ``ood.<name>`` (:mod:`ranker.model.ood`);
- ``config.json``: a :class:`~ranker.model.card.ModelCard` (head config, encoder id, layers,
  target transform, creation time, training info, and the model version it was saved as);
- ``metrics.json`` (optional): evaluation results, informational only.

The version is a content hash (:mod:`ranker.model.card`). Which version serves, loading it (or a
seeded head) and promoting another are in :mod:`ranker.model.registry`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save as save_safetensors

from indexes.durable import fsync_dir
from ranker.model.artifact_files import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    ModelArtifactError,
    check_tensors,
    read_card,
    read_metrics,
    read_ood,
    read_weights,
    write_file,
)
from ranker.model.card import FORMAT, ModelCard, content_hash, version_from
from ranker.model.head import ApexHead, HeadConfig
from ranker.model.ood import OodModel
from ranker.model.readout import LikeReadout

log = logging.getLogger(__name__)

#: MERT hidden-state indices the paper pools (index 0 is the feature projection).
DEFAULT_LAYERS: tuple[int, ...] = (2, 5, 8, 12)

Device = str | torch.device


def resolve_device(device: Device) -> torch.device:
    """``auto`` means the first GPU when there is one."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Prediction:
    """Scores with what the model knows of their reliability (:meth:`ScoringModel.predict_full`).

    ``mean`` is exactly :meth:`ScoringModel.predict`'s output. ``members`` (K, B, T) are the
    ensemble members' scores and ``spread`` (B, T) their standard deviation, both None for a
    single head; ``ood_percentile`` (B,) is None without an OOD model.
    """

    mean: npt.NDArray[np.float32]
    members: npt.NDArray[np.float32] | None = None
    spread: npt.NDArray[np.float32] | None = None
    ood_percentile: npt.NDArray[np.float64] | None = None

    def take(self, rows: npt.ArrayLike) -> Prediction:
        """The prediction of the songs at ``rows`` only (e.g. those with finite scores)."""
        idx = np.asarray(rows, dtype=np.int64)
        return Prediction(
            mean=self.mean[idx],
            members=self.members[:, idx] if self.members is not None else None,
            spread=self.spread[idx] if self.spread is not None else None,
            ood_percentile=self.ood_percentile[idx] if self.ood_percentile is not None else None,
        )


def member_key(i: int, name: str) -> str:
    """The weights-file name of ensemble member ``i``'s tensor ``name``."""
    return f"member{i}.{name}"


class ScoringModel:
    """A frozen head (or a deep ensemble of heads) ready to score: eval mode, on one device, with its
    card and version, and optionally an out-of-distribution model.

    Treat it as immutable: after more training, build a new one with :meth:`from_head`.
    """

    def __init__(
        self,
        head: ApexHead | Sequence[ApexHead],
        card: ModelCard,
        *,
        device: Device = "cpu",
        metrics: Mapping[str, Any] | None = None,
        ood: OodModel | None = None,
    ) -> None:
        heads = [head] if isinstance(head, ApexHead) else list(head)
        if len(heads) != card.ensemble:
            raise ValueError(f"card.ensemble is {card.ensemble} but {len(heads)} heads were given")
        if any(h.config != card.head for h in heads):
            raise ValueError("the head's config differs from card.head")
        if (ood is None) != (card.ood is None):
            raise ValueError("card.ood and the OOD model must be given together")
        if ood is not None and ood.dim != card.head.n_layers * card.head.input_dim:
            raise ValueError(f"the OOD model takes {ood.dim} features, not the head's {card.head.n_layers} layers")
        self._device = resolve_device(device)
        self._heads = [h.to(self._device).eval() for h in heads]
        self._head = self._heads[0]
        for h in self._heads:
            for p in h.parameters():
                p.requires_grad_(False)
        self._ood = ood
        self._digest = content_hash(self._state(), card)
        self._version = version_from(self._digest, card)
        self._card = card.model_copy(update={"model_version": self._version})
        self._readout = LikeReadout.from_dict(card.like_readout) if card.like_readout is not None else None
        self.metrics: dict[str, Any] | None = dict(metrics) if metrics is not None else None

    # Construction -------------------------------------------------------------------
    @classmethod
    def from_seed(
        cls,
        input_dim: int,
        seed: int,
        encoder_id: str,
        *,
        n_layers: int = 4,
        layers: Sequence[int] | None = DEFAULT_LAYERS,
        head_config: HeadConfig | None = None,
        device: Device = "cpu",
    ) -> ScoringModel:
        """An untrained head initialised from ``seed``: same seed, same weights, same version.

        Its scores carry no information about songs; it exists so that the pipeline runs end
        to end before a trained head is available. The global torch RNG is left untouched.
        """
        config = head_config or HeadConfig(input_dim=input_dim, n_layers=n_layers)
        if config.input_dim != input_dim or config.n_layers != n_layers:
            raise ValueError("head_config disagrees with input_dim / n_layers")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = ApexHead(config)
        card = ModelCard(
            head=config,
            encoder_id=encoder_id,
            layers=tuple(layers) if layers is not None else None,
            training=None,
            init_seed=seed,
        )
        return cls(head, card, device=device)

    @classmethod
    def from_head(
        cls,
        head: ApexHead | Sequence[ApexHead],
        *,
        encoder_id: str,
        training: Mapping[str, Any],
        layers: Sequence[int] | None = DEFAULT_LAYERS,
        target_transform: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        init_seed: int | None = None,
        device: Device = "cpu",
        ood: OodModel | None = None,
        ood_info: Mapping[str, Any] | None = None,
    ) -> ScoringModel:
        """Wrap a trained head, or the members of a deep ensemble (copied, so further training does
        not change this model), with an optional OOD model (``ood_info`` goes in the card)."""
        heads = [head] if isinstance(head, ApexHead) else list(head)
        card = ModelCard(
            head=heads[0].config,
            encoder_id=encoder_id,
            layers=tuple(layers) if layers is not None else None,
            target_transform=dict(target_transform) if target_transform is not None else None,
            training=dict(training),
            init_seed=init_seed,
            ensemble=len(heads),
            ood=(dict(ood_info or {}) if ood is not None else None),
        )
        return cls(copy.deepcopy(heads), card, device=device, metrics=metrics, ood=ood)

    def with_target_transform(
        self, target_transform: Mapping[str, Any], training: Mapping[str, Any] | None = None
    ) -> ScoringModel:
        """The same head with another target transform (a new card, so a new version).

        ``training`` entries are added to the card's training record (how the transform came about).
        """
        return self._with_card({"target_transform": dict(target_transform)}, training)

    def with_like_readout(
        self,
        readout: LikeReadout,
        training: Mapping[str, Any] | None = None,
        target_transform: Mapping[str, Any] | None = None,
    ) -> ScoringModel:
        """The same head whose likes output is ``readout``'s score (a new card, so a new version).

        ``target_transform``, if given, replaces the card's in the same step (the read-out's curve).
        """
        update: dict[str, Any] = {"like_readout": readout.to_dict()}
        if target_transform is not None:
            update["target_transform"] = dict(target_transform)
        return self._with_card(update, training)

    def with_training(self, training: Mapping[str, Any]) -> ScoringModel:
        """A copy of this model with ``training`` merged into its card's training record."""
        return self._with_card({}, training)

    def _with_card(self, update: dict[str, Any], training: Mapping[str, Any] | None) -> ScoringModel:
        """A copy of this model whose card has ``update`` (validated), ``training`` merged into its record."""
        if training:
            update = {**update, "training": {**(self._card.training or {}), **training}}
        card = ModelCard.model_validate({**self._card.model_dump(), **update})
        return ScoringModel(copy.deepcopy(self._heads), card, device=self._device, metrics=self.metrics, ood=self._ood)

    def _state(self) -> dict[str, torch.Tensor]:
        """Every tensor the weights file holds (and the version hashes)."""
        if len(self._heads) == 1:
            state = dict(self._head.state_dict())
        else:
            state = {member_key(i, k): v for i, h in enumerate(self._heads) for k, v in h.state_dict().items()}
        if self._ood is not None:
            state.update(self._ood.tensors())
        return state

    # Properties ---------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._version

    @property
    def digest(self) -> str:
        """The full sha256 content hash the version is cut from."""
        return self._digest

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def head(self) -> ApexHead:
        """The (first) head: an ensemble's member 0."""
        return self._head

    @property
    def heads(self) -> tuple[ApexHead, ...]:
        """Every member of the ensemble (one for a single head)."""
        return tuple(self._heads)

    @property
    def ensemble_size(self) -> int:
        return len(self._heads)

    @property
    def ood(self) -> OodModel | None:
        """The out-of-distribution model fitted on the training songs, if the model has one."""
        return self._ood

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def encoder_id(self) -> str:
        return self._card.encoder_id

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._card.head.tasks

    @property
    def input_dim(self) -> int:
        return self._card.head.input_dim

    @property
    def n_layers(self) -> int:
        return self._card.head.n_layers

    @property
    def layers(self) -> tuple[int, ...] | None:
        return self._card.layers

    @property
    def target_transform(self) -> dict[str, Any] | None:
        return self._card.target_transform

    @property
    def like_readout(self) -> LikeReadout | None:
        """The read-out that gives the likes output, if the model has one."""
        return self._readout

    @property
    def trained(self) -> bool:
        return self._card.training is not None

    def __repr__(self) -> str:
        return f"ScoringModel({self.version!r}, encoder={self.encoder_id!r}, tasks={list(self.tasks)})"

    # Scoring ------------------------------------------------------------------------
    def predict(self, features: npt.ArrayLike, *, batch_size: int = 4096) -> npt.NDArray[np.float32]:
        """Scores (B, T) float32 for features (B, n_layers, input_dim); columns follow :attr:`tasks`.

        An ensemble's scores are its members' mean."""
        x = self._check(features, batch_size)
        if len(self._heads) > 1:
            return self._members(x, batch_size).mean(axis=0, dtype=np.float32)
        out = np.empty((len(x), len(self.tasks)), dtype=np.float32)
        # The head is small: on the CPU one thread is faster, and a second OpenMP thread on a busy
        # core made worker batches 10-30x slower (benchmarks/worker_throughput.py, part c).
        threads = torch.get_num_threads()
        single = self._device.type == "cpu" and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            self._predict_into(self._head, x, out, batch_size)
        finally:
            if single:
                torch.set_num_threads(threads)
        if self._readout is not None:
            out[:, self.tasks.index("likes")] = self._readout.scores(x.reshape(len(x), -1))
        return out

    def predict_full(self, features: npt.ArrayLike, *, batch_size: int = 4096) -> Prediction:
        """:meth:`predict` plus the ensemble's members and spread and the OOD percentile (where the model
        has them). A single head's ``mean`` is bit-identical to :meth:`predict`."""
        x = self._check(features, batch_size)
        ood = self._ood.score(x) if self._ood is not None else None
        if len(self._heads) == 1:
            return Prediction(self.predict(x, batch_size=batch_size), ood_percentile=ood)
        members = self._members(x, batch_size)
        return Prediction(
            mean=members.mean(axis=0, dtype=np.float32),
            members=members,
            spread=members.std(axis=0, dtype=np.float32),
            ood_percentile=ood,
        )

    def _check(self, features: npt.ArrayLike, batch_size: int) -> npt.NDArray[np.float32]:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.n_layers, self.input_dim):
            raise ValueError(f"expected features of shape (batch, {self.n_layers}, {self.input_dim}), got {x.shape}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"features contain NaN or inf in rows {bad[:10].tolist()} ({len(bad)} rows)")
        return x

    def _members(self, x: np.ndarray, batch_size: int) -> npt.NDArray[np.float32]:
        """(K, B, T): every member's scores, the like read-out (shared by all members) applied to each."""
        out = np.empty((len(self._heads), len(x), len(self.tasks)), dtype=np.float32)
        threads = torch.get_num_threads()
        single = self._device.type == "cpu" and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            for i, head in enumerate(self._heads):
                self._predict_into(head, x, out[i], batch_size)
        finally:
            if single:
                torch.set_num_threads(threads)
        if self._readout is not None:
            out[:, :, self.tasks.index("likes")] = self._readout.scores(x.reshape(len(x), -1))[None, :]
        return out

    def _predict_into(self, head: ApexHead, x: np.ndarray, out: np.ndarray, batch_size: int) -> None:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                chunk = torch.from_numpy(x[start : start + batch_size]).to(self._device)
                out[start : start + len(chunk)] = head(chunk).float().cpu().numpy()

    # Persistence --------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model directory atomically (temp dir + rename); returns its path.

        Saving onto an existing directory of the same version is a no-op; onto anything
        else it is a :class:`FileExistsError`.
        """
        target = Path(directory)
        if target.exists() or target.is_symlink():
            return self._check_existing(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self._state().items()}
            weights = save_safetensors(state, metadata={"format": FORMAT, "model_version": self.version})
            write_file(tmp / WEIGHTS_FILE, weights)
            write_file(tmp / CONFIG_FILE, self._card.model_dump_json(indent=2).encode() + b"\n")
            if self.metrics is not None:
                text = json.dumps(self.metrics, indent=2, sort_keys=True, default=str)
                write_file(tmp / METRICS_FILE, text.encode() + b"\n")
            fsync_dir(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if target.exists():  # somebody else saved it first
                    return self._check_existing(target)
                raise
            fsync_dir(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def save_versioned(self, models_root: str | os.PathLike[str]) -> Path:
        """Save to ``models_root/<version>`` (the layout :func:`promote` expects)."""
        return self.save(Path(models_root) / self.version)

    def _check_existing(self, target: Path) -> Path:
        try:
            existing = ScoringModel.load(target)
        except ModelArtifactError as exc:
            raise FileExistsError(f"{target} exists and is not a loadable model: {exc}") from exc
        if existing.version != self.version:
            raise FileExistsError(f"{target} already holds model {existing.version}, not {self.version}")
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: Device = "cpu") -> ScoringModel:
        """Load a model directory (safetensors weights only), validating config, tensors and hash."""
        path = Path(directory)
        if not path.is_dir():
            raise ModelArtifactError(f"model directory {path} does not exist or is not a directory")
        card = read_card(path)
        tensors = read_weights(path)
        ood = read_ood(path, card, tensors)
        heads = []
        for i in range(card.ensemble):
            with torch.random.fork_rng(devices=[]):
                head = ApexHead(card.head)
            if card.ensemble == 1:
                own = tensors
            else:
                prefix = member_key(i, "")
                own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            check_tensors(path, head, own)
            head.load_state_dict(own, strict=True)
            heads.append(head)
        if card.ensemble > 1:
            # Every tensor must belong to one of the card's members: a member beyond the ensemble
            # size (or any other name) means the weights and the config disagree.
            prefixes = tuple(member_key(i, "") for i in range(card.ensemble))
            stray = sorted(k for k in tensors if not k.startswith(prefixes))
            if stray:
                raise ModelArtifactError(f"{path / WEIGHTS_FILE}: unexpected tensors {stray[:8]} in an ensemble")
        model = cls(heads, card, device=device, metrics=read_metrics(path), ood=ood)
        if card.model_version is not None and card.model_version != model.version:
            raise ModelArtifactError(
                f"{path}: config.json says model_version {card.model_version} but the files hash to "
                f"{model.version}: the weights or the config were changed or corrupted after saving"
            )
        return model
