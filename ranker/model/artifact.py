"""Model directories: how a trained (or seeded) APEX head is stored, versioned, loaded and promoted.

A model directory holds

- ``model.safetensors``: the head's tensors (safetensors only: a model file can never run code);
- ``config.json``: a :class:`ModelCard` (head config, encoder id, layers, target transform,
  creation time, training info, and the model version it was saved as);
- ``metrics.json`` (optional): evaluation results, informational only.

The model version is derived from a sha256 over the tensors and the card (minus its creation
time), so the same weights and settings always get the same version, and a version names
exactly one behaviour. Trained heads are ``apex-<12 hex>``; untrained heads initialised from
a seed are ``untrained-seed<N>-<12 hex>`` so that nobody mistakes their scores for real ones.

``models_root/current`` (a symlink, or a file holding a directory name) says which version
serves; :func:`promote` swaps it atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ranker.errors import ConfigError
from ranker.model.head import ApexHead, HeadConfig
from ranker.model.readout import LikeReadout

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CURRENT_LINK = "current"
FORMAT = "apexrank-head"
FORMAT_VERSION = 1
#: MERT hidden-state indices the paper pools (index 0 is the feature projection).
DEFAULT_LAYERS: tuple[int, ...] = (2, 5, 8, 12)

Device = str | torch.device


class ModelArtifactError(ConfigError):
    """A model directory is missing, incomplete, corrupt or does not fit the configured encoder."""


class ModelCard(BaseModel):
    """The contents of ``config.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["apexrank-head"] = "apexrank-head"
    format_version: Literal[1] = 1
    head: HeadConfig
    encoder_id: str = Field(min_length=1, description="The encoder the head was trained on.")
    layers: tuple[int, ...] | None = Field(None, description="Encoder layers pooled into the features.")
    target_transform: dict[str, Any] | None = Field(
        None, description="Parameters of the raw-count -> score transform (ranker.model.targets)."
    )
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    like_readout: dict[str, Any] | None = Field(
        None, description="A like-rate read-out that gives the likes output (ranker.model.readout); None: the head."
    )
    training: dict[str, Any] | None = Field(None, description="How it was trained; None: never trained.")
    init_seed: int | None = Field(None, description="Seed the weights were initialised from.")
    model_version: str | None = Field(None, description="Written on save; checked on load.")

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if self.layers is not None and len(self.layers) != self.head.n_layers:
            raise ValueError(f"layers {list(self.layers)} do not match head.n_layers={self.head.n_layers}")
        if self.training is None and self.init_seed is None:
            raise ValueError("an untrained model (training is null) must record its init_seed")
        if self.like_readout is not None:
            readout = LikeReadout.from_dict(self.like_readout)
            if "likes" not in self.head.tasks:
                raise ValueError("a like read-out needs a head with a likes output")
            if readout.dim != self.head.n_layers * self.head.input_dim:
                raise ValueError(
                    f"the like read-out takes {readout.dim} features; the head's are "
                    f"{self.head.n_layers} x {self.head.input_dim}"
                )
        return self

    def hashed_json(self) -> bytes:
        """The card as canonical JSON, without the fields that do not change behaviour."""
        data = self.model_dump(mode="json", exclude={"created_at", "model_version"})
        if not data["head"].get("input_norm"):
            del data["head"]["input_norm"]  # a card from before the field existed keeps its version
        if data.get("like_readout") is None:
            data.pop("like_readout", None)  # likewise
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def content_hash(state: Mapping[str, torch.Tensor], card: ModelCard) -> str:
    """sha256 over the card and every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{FORMAT_VERSION}\0".encode())
    h.update(card.hashed_json())
    for name in sorted(state):
        t = state[name]
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def version_from(digest: str, card: ModelCard) -> str:
    """``apex-<12 hex>`` for trained heads, ``untrained-seed<N>-<12 hex>`` for seeded ones."""
    if card.training is None:
        return f"untrained-seed{card.init_seed}-{digest[:12]}"
    return f"apex-{digest[:12]}"


def resolve_device(device: Device) -> torch.device:
    """``auto`` means the first GPU when there is one."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ScoringModel:
    """A frozen head ready to score: eval mode, on one device, with its card and version.

    Treat it as immutable: after more training, build a new one with :meth:`from_head`.
    """

    def __init__(
        self,
        head: ApexHead,
        card: ModelCard,
        *,
        device: Device = "cpu",
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        if head.config != card.head:
            raise ValueError("the head's config differs from card.head")
        self._device = resolve_device(device)
        self._head = head.to(self._device).eval()
        for p in self._head.parameters():
            p.requires_grad_(False)
        self._digest = content_hash(self._head.state_dict(), card)
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
        head: ApexHead,
        *,
        encoder_id: str,
        training: Mapping[str, Any],
        layers: Sequence[int] | None = DEFAULT_LAYERS,
        target_transform: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        init_seed: int | None = None,
        device: Device = "cpu",
    ) -> ScoringModel:
        """Wrap a trained head (copied, so further training does not change this model)."""
        card = ModelCard(
            head=head.config,
            encoder_id=encoder_id,
            layers=tuple(layers) if layers is not None else None,
            target_transform=dict(target_transform) if target_transform is not None else None,
            training=dict(training),
            init_seed=init_seed,
        )
        return cls(copy.deepcopy(head), card, device=device, metrics=metrics)

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

    def _with_card(self, update: dict[str, Any], training: Mapping[str, Any] | None) -> ScoringModel:
        """A copy of this model whose card has ``update`` (validated), ``training`` merged into its record."""
        if training:
            update = {**update, "training": {**(self._card.training or {}), **training}}
        card = ModelCard.model_validate({**self._card.model_dump(), **update})
        return ScoringModel(copy.deepcopy(self._head), card, device=self._device, metrics=self.metrics)

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
        return self._head

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
        """Scores (B, T) float32 for features (B, n_layers, input_dim); columns follow :attr:`tasks`."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.n_layers, self.input_dim):
            raise ValueError(f"expected features of shape (batch, {self.n_layers}, {self.input_dim}), got {x.shape}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"features contain NaN or inf in rows {bad[:10].tolist()} ({len(bad)} rows)")
        out = np.empty((len(x), len(self.tasks)), dtype=np.float32)
        # The head is small: on the CPU one thread is faster, and a second OpenMP thread on a busy
        # core made worker batches 10-30x slower (benchmarks/worker_throughput.py, part c).
        threads = torch.get_num_threads()
        single = self._device.type == "cpu" and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            self._predict_into(x, out, batch_size)
        finally:
            if single:
                torch.set_num_threads(threads)
        if self._readout is not None:
            out[:, self.tasks.index("likes")] = self._readout.scores(x.reshape(len(x), -1))
        return out

    def _predict_into(self, x: np.ndarray, out: np.ndarray, batch_size: int) -> None:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                chunk = torch.from_numpy(x[start : start + batch_size]).to(self._device)
                out[start : start + len(chunk)] = self._head(chunk).float().cpu().numpy()

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
            state = {k: v.detach().to("cpu").contiguous() for k, v in self._head.state_dict().items()}
            weights = save_safetensors(state, metadata={"format": FORMAT, "model_version": self.version})
            _write_file(tmp / WEIGHTS_FILE, weights)
            _write_file(tmp / CONFIG_FILE, self._card.model_dump_json(indent=2).encode() + b"\n")
            if self.metrics is not None:
                text = json.dumps(self.metrics, indent=2, sort_keys=True, default=str)
                _write_file(tmp / METRICS_FILE, text.encode() + b"\n")
            _fsync_dir(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if target.exists():  # somebody else saved it first
                    return self._check_existing(target)
                raise
            _fsync_dir(target.parent)
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
        card = _read_card(path)
        tensors = _read_weights(path)
        with torch.random.fork_rng(devices=[]):
            head = ApexHead(card.head)
        _check_tensors(path, head, tensors)
        head.load_state_dict(tensors, strict=True)
        model = cls(head, card, device=device, metrics=_read_metrics(path))
        if card.model_version is not None and card.model_version != model.version:
            raise ModelArtifactError(
                f"{path}: config.json says model_version {card.model_version} but the files hash to "
                f"{model.version}: the weights or the config were changed or corrupted after saving"
            )
        return model


# File helpers -----------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_card(path: Path) -> ModelCard:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelArtifactError(
            f"{path} has no {CONFIG_FILE}; a model directory holds {WEIGHTS_FILE} and {CONFIG_FILE}"
        )
    try:
        return ModelCard.model_validate_json(config_path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelArtifactError(f"{config_path} is not a valid model config: {problems}") from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"})
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
        raise ModelArtifactError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        return load_safetensors(weights_path.read_bytes())
    except Exception as exc:  # safetensors raises its own error type for any malformed file
        raise ModelArtifactError(f"{weights_path} is not a readable safetensors file: {exc}") from exc


def _check_tensors(path: Path, head: ApexHead, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelArtifactError(
            f"{path / WEIGHTS_FILE} does not match its config: missing tensors {missing[:8]}, "
            f"unexpected tensors {unexpected[:8]}"
        )
    wrong = [
        f"{name} {list(tensors[name].shape)} (expected {list(t.shape)})"
        for name, t in expected.items()
        if tensors[name].shape != t.shape
    ]
    if wrong:
        raise ModelArtifactError(f"{path / WEIGHTS_FILE} has tensors of the wrong shape: {'; '.join(wrong[:8])}")
    for name, t in tensors.items():
        if t.is_floating_point() != expected[name].is_floating_point():
            raise ModelArtifactError(f"{path / WEIGHTS_FILE}: tensor {name} has dtype {t.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelArtifactError(f"{path / WEIGHTS_FILE}: tensor {name} contains NaN or inf")


def _read_metrics(path: Path) -> dict[str, Any] | None:
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        return None
    try:
        data = json.loads(metrics_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Metrics are informational: an unreadable file must not stop a model from serving.
        log.warning("ignoring unreadable %s: %s", metrics_path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: expected a JSON object", metrics_path)
        return None
    return data


# Locating and promoting models ------------------------------------------------------
def resolve_model_dir(head_dir: str | os.PathLike[str]) -> Path | None:
    """The model directory that ``head_dir`` designates, or None when it designates none yet.

    ``head_dir`` may be a model directory (or a symlink to one), a directory holding a
    ``current`` symlink or ``current`` file, or a ``current`` file whose text names a model
    directory relative to the folder it lives in. A ``current`` pointer to nothing is an error:
    silently serving an untrained head instead would hide a broken deployment.
    """
    path = Path(head_dir)
    if path.is_file():
        return _follow_pointer_file(path)
    if path.is_symlink() and not path.exists():
        raise ModelArtifactError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        # Resolve a symlink once, so that a promote() racing with the load cannot mix the
        # config of one version with the weights of another.
        return path.resolve() if path.is_symlink() else path
    current = path / CURRENT_LINK
    if current.is_symlink() or current.exists():
        return resolve_model_dir(current)
    return None


def _follow_pointer_file(path: Path) -> Path:
    name = path.read_text(encoding="utf-8").strip()
    if not name:
        raise ModelArtifactError(f"{path} is empty; it should name a model directory")
    target = path.parent / name
    if not target.is_dir():
        raise ModelArtifactError(f"{path} names {name!r}, but {target} is not a directory")
    return target


def load_or_init(
    head_dir: str | os.PathLike[str] | None,
    *,
    input_dim: int,
    encoder_id: str,
    seed: int,
    n_layers: int = 4,
    layers: Sequence[int] | None = None,
    device: Device = "cpu",
) -> ScoringModel:
    """Load the model ``head_dir`` designates, or, when there is none, the head seeded by ``seed``.

    A loaded model must have been trained on the configured encoder: its encoder_id, input
    size, layer count (and ``layers``, when given) must match, else :class:`ConfigError`.
    """
    model_dir = resolve_model_dir(head_dir) if head_dir is not None else None
    if model_dir is None:
        model = ScoringModel.from_seed(
            input_dim,
            seed,
            encoder_id,
            n_layers=n_layers,
            layers=tuple(layers) if layers is not None else DEFAULT_LAYERS,
            device=device,
        )
        log.warning("no trained APEX head at %s: using %s (scores are not meaningful)", head_dir, model.version)
        return model
    model = ScoringModel.load(model_dir, device=device)
    problems = []
    if model.encoder_id != encoder_id:
        problems.append(f"it was trained on encoder {model.encoder_id!r}, the configured encoder is {encoder_id!r}")
    if model.input_dim != input_dim or model.n_layers != n_layers:
        problems.append(
            f"it expects features of shape ({model.n_layers}, {model.input_dim}), "
            f"the encoder gives ({n_layers}, {input_dim})"
        )
    if layers is not None and model.layers is not None and tuple(layers) != model.layers:
        problems.append(f"it was trained on layers {list(model.layers)}, the configured layers are {list(layers)}")
    if problems:
        raise ConfigError(
            f"the APEX head at {model_dir} ({model.version}) does not fit this encoder: "
            + "; ".join(problems)
            + ". Configure the encoder it was trained on, point model.head_dir at a head trained "
            "for this encoder, or remove the head to start from the untrained seeded one."
        )
    log.info("loaded APEX head %s from %s", model.version, model_dir)
    return model


def promote(models_root: str | os.PathLike[str], model_dir: str | os.PathLike[str]) -> str:
    """Point ``models_root/current`` at ``model_dir`` atomically; returns the promoted version.

    The model is loaded first (so a broken directory is never promoted); the new symlink is
    made beside the old one and renamed over it, so readers see either the old or the new
    model, never neither. The link is relative when ``model_dir`` is inside ``models_root``.
    """
    root = Path(models_root)
    target = Path(model_dir)
    model = ScoringModel.load(target)
    root.mkdir(parents=True, exist_ok=True)
    current = root / CURRENT_LINK
    if current.is_dir() and not current.is_symlink():
        raise ModelArtifactError(f"{current} is a real directory; move it aside so it can become a symlink")
    try:
        link_target = os.path.relpath(target.resolve(), root.resolve())
        if link_target.startswith(os.pardir):
            link_target = str(target.resolve())
    except ValueError:  # different drives
        link_target = str(target.resolve())
    tmp = root / f".{CURRENT_LINK}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(link_target, tmp, target_is_directory=True)
    try:
        os.replace(tmp, current)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)
    log.info("promoted %s (%s)", model.version, target)
    return model.version
