"""What a model directory says about itself: its card (``config.json``) and its content version.

The model version is derived from a sha256 over the tensors and the card (minus its creation
time), so the same weights and settings always get the same version, and a version names
exactly one behaviour. Trained heads are ``apex-<12 hex>``; untrained heads initialised from
a seed are ``untrained-seed<N>-<12 hex>`` so that nobody mistakes their scores for real ones.

Kept apart from :mod:`ranker.model.artifact` (the scoring model, saving and loading) because the
card's schema and the hash that versions it are the format's definition: a change here changes
every model's version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import torch
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from ranker.model.head import HeadConfig
from ranker.model.readout import LikeReadout

FORMAT = "apexrank-head"
FORMAT_VERSION = 1


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
    ensemble: int = Field(
        1, ge=1, description="Heads in the deep ensemble (members trained with different seeds); 1: one head."
    )
    ood: dict[str, Any] | None = Field(
        None, description="How the out-of-distribution distance was fitted (ranker.model.ood); None: no OOD model."
    )
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
        if data.get("ensemble") == 1:
            del data["ensemble"]  # likewise: a single head hashes as before ensembles existed
        if data.get("ood") is None:
            data.pop("ood", None)
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
