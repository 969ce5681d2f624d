"""The files of a model directory: writing them durably, and reading each back with a clear error.

:class:`~ranker.model.artifact.ScoringModel` saves and loads through these; a directory that is
missing, incomplete, corrupt, or holds a model other than its config says raises
:class:`ModelArtifactError`, never a bare traceback from safetensors or pydantic.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors

from ranker.errors import ConfigError
from ranker.model.card import ModelCard
from ranker.model.head import ApexHead
from ranker.model.ood import PREFIX as OOD_PREFIX
from ranker.model.ood import OodModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


class ModelArtifactError(ConfigError):
    """A model directory is missing, incomplete, corrupt or does not fit the configured encoder."""


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_card(path: Path) -> ModelCard:
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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"})
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
        raise ModelArtifactError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        return load_safetensors(weights_path.read_bytes())
    except Exception as exc:  # safetensors raises its own error type for any malformed file
        raise ModelArtifactError(f"{weights_path} is not a readable safetensors file: {exc}") from exc


def read_ood(path: Path, card: ModelCard, tensors: dict[str, torch.Tensor]) -> OodModel | None:
    """Pop the OOD model's tensors out of ``tensors``; the model when the card says there is one."""
    own = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(OOD_PREFIX)]}
    if card.ood is None:
        if own:
            raise ModelArtifactError(f"{path / WEIGHTS_FILE} holds OOD tensors but {CONFIG_FILE} names no OOD model")
        return None
    try:
        return OodModel.from_tensors(own)
    except (KeyError, ValueError) as exc:
        raise ModelArtifactError(f"{path / WEIGHTS_FILE}: the OOD model is missing or malformed ({exc})") from exc


def missing_and_unexpected(
    expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """The tensor names a head's state needs that ``tensors`` lacks, and those it has that the head does not."""
    return sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))


def wrong_shapes(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Each tensor of another shape than the head's, described (the names must match: check them first)."""
    return [
        f"{name} {list(tensors[name].shape)} (expected {list(t.shape)})"
        for name, t in expected.items()
        if tensors[name].shape != t.shape
    ]


def check_tensors(path: Path, head: ApexHead, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = head.state_dict()
    missing, unexpected = missing_and_unexpected(expected, tensors)
    if missing or unexpected:
        raise ModelArtifactError(
            f"{path / WEIGHTS_FILE} does not match its config: missing tensors {missing[:8]}, "
            f"unexpected tensors {unexpected[:8]}"
        )
    wrong = wrong_shapes(expected, tensors)
    if wrong:
        raise ModelArtifactError(f"{path / WEIGHTS_FILE} has tensors of the wrong shape: {'; '.join(wrong[:8])}")
    for name, t in tensors.items():
        if t.is_floating_point() != expected[name].is_floating_point():
            raise ModelArtifactError(f"{path / WEIGHTS_FILE}: tensor {name} has dtype {t.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelArtifactError(f"{path / WEIGHTS_FILE}: tensor {name} contains NaN or inf")


def read_metrics(path: Path) -> dict[str, Any] | None:
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
