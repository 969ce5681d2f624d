"""The encoder interface: audio segments in, pooled layer features out.

Every encoder returns, for each segment, ``n_layers`` pooled feature vectors of
``dim`` values (for MERT: the time-mean of hidden layers 2, 5, 8 and 12 over
the segment's real frames) plus the number of real frames, so that a song's
features are the frame-weighted mean over its segments: padding never counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncoderSpec:
    """What a head, an index and a stored embedding need to know of an encoder.

    Known without loading any weights (see :func:`ranker.encoders.encoder_spec`), so that a
    job that only scores stored embeddings (retraining) never loads a model it does not run.
    """

    name: str
    encoder_id: str
    sample_rate: int
    n_layers: int
    dim: int
    vector_dim: int
    #: the hidden states pooled, for encoders whose settings choose them (MERT); else None
    layers: tuple[int, ...] | None = None


class Encoder(ABC):
    """Turns mono waveforms at :attr:`sample_rate` into pooled layer features."""

    #: short name used in settings (``mert``, ``logmel``)
    name: str
    #: identifies the weights and options; stored with every embedding and model
    encoder_id: str
    sample_rate: int
    n_layers: int
    dim: int

    @abstractmethod
    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Encode 1-D float32 segments (each at most one segment long, any lengths mixed).

        Returns ``(features, frames)``: features float32 of shape (N, n_layers, dim),
        pooled over each segment's real frames only; frames int64 of shape (N,).
        Batching across segments is the encoder's business and must not change results
        beyond float tolerance.
        """

    @property
    def spec(self) -> EncoderSpec:
        """This encoder's :class:`EncoderSpec` (the same ``encoder_spec(settings)`` gives)."""
        return EncoderSpec(self.name, self.encoder_id, self.sample_rate, self.n_layers, self.dim, self.vector_dim)

    @property
    def vector_dim(self) -> int:
        """Length of :meth:`song_vector`'s output (the similarity index's dimension)."""
        return self.dim

    def song_vector(self, layers: np.ndarray) -> np.ndarray:
        """The vector that represents a song in the similarity index (not L2-normalised).

        ``layers`` is a song's pooled features, shape (n_layers, dim), e.g. from
        :func:`pool_song`. The default averages the layers; encoders whose raw features
        make cosine similarity meaningless override it and :attr:`vector_dim`.
        """
        return np.asarray(layers, dtype=np.float32).mean(axis=0)


def pool_song(features: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Frame-weighted mean of a song's segment features: (S, L, D) x (S,) -> (L, D)."""
    weights = np.asarray(frames, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    pooled = np.tensordot(weights / weights.sum(), np.asarray(features, dtype=np.float64), axes=(0, 0))
    return pooled.astype(np.float32)
