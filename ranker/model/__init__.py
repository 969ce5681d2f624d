"""The APEX head, its stored form and its training targets.

Submodules: :mod:`ranker.model.head` (the network and its loss), :mod:`ranker.model.artifact`
(model directories, loading and saving), :mod:`ranker.model.card` (config.json and versions),
:mod:`ranker.model.registry` (the current model and promotion) and :mod:`ranker.model.targets`
(raw engagement counts -> 0-100 scores). Names are imported lazily so that code needing only the
target transform does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ranker.model.artifact import ModelArtifactError, ScoringModel
    from ranker.model.card import ModelCard
    from ranker.model.head import ApexHead, HeadConfig
    from ranker.model.registry import load_or_init, promote, resolve_model_dir
    from ranker.model.targets import TargetTransform

_EXPORTS = {
    "ApexHead": "ranker.model.head",
    "HeadConfig": "ranker.model.head",
    "ModelArtifactError": "ranker.model.artifact",
    "ModelCard": "ranker.model.card",
    "ScoringModel": "ranker.model.artifact",
    "load_or_init": "ranker.model.registry",
    "promote": "ranker.model.registry",
    "resolve_model_dir": "ranker.model.registry",
    "TargetTransform": "ranker.model.targets",
}

__all__ = [
    "ApexHead",
    "HeadConfig",
    "ModelArtifactError",
    "ModelCard",
    "ScoringModel",
    "TargetTransform",
    "load_or_init",
    "promote",
    "resolve_model_dir",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ranker.model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
