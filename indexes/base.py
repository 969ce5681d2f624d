"""Storage interfaces: one small abstract class per storage concern.

``indexes`` is the bottom layer: it knows nothing of models, Kafka or audio.
Records here are plain data; the ranker and the consumers map their own types
onto them. Backends live one per module and are chosen by URL scheme.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ID_MASK = (1 << 63) - 1


def song_key(song_id: str) -> int:
    """Stable positive int64 id for a song (FAISS ids are int64): 63 bits of BLAKE2b."""
    digest = hashlib.blake2b(song_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _ID_MASK


@dataclass(frozen=True)
class EmbeddingRecord:
    """What the encoder produced for one song: the source of truth for the vector index."""

    song_id: str
    encoder_id: str
    layers: np.ndarray  # (n_layers, dim) float32: pooled layer features, for (re)training heads
    vector: np.ndarray  # (vector_dim,) float32, L2-normalised: what the similarity index holds
    n_segments: int
    n_frames: int


@dataclass(frozen=True)
class StoredEmbedding:
    """An embedding as read back from the store, with its insertion sequence number."""

    seq: int
    key: int
    record: EmbeddingRecord


@dataclass(frozen=True)
class SongRecord:
    """A scored song as the score store keeps it (one Redis hash per song)."""

    song_id: str
    model_version: str
    scores: dict[str, float]
    rank_score: float
    generator: str
    created_at: str  # RFC 3339
    scored_at: str  # RFC 3339
    extra: dict[str, Any] = field(default_factory=dict)


class EmbeddingStore(ABC):
    """Durable per-song embeddings (pooled layers + index vector); upserts are idempotent."""

    @abstractmethod
    def put_many(self, records: Sequence[EmbeddingRecord]) -> None:
        """Insert or replace, durably (committed and synced) before returning."""

    @abstractmethod
    def get(self, song_id: str) -> StoredEmbedding | None: ...

    @abstractmethod
    def contains(self, song_ids: Sequence[str]) -> set[str]:
        """The subset of ``song_ids`` already stored."""

    @abstractmethod
    def iter_since(self, seq: int, batch_size: int = 4096) -> Iterator[StoredEmbedding]:
        """Records written after sequence number ``seq`` (0 = all), in sequence order."""

    @abstractmethod
    def max_seq(self) -> int: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


class VectorIndex(ABC):
    """Nearest-neighbour search over song vectors keyed by :func:`song_key`."""

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @abstractmethod
    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under int64 keys, replacing any existing vector with the same key."""

    @abstractmethod
    def remove(self, keys: np.ndarray) -> int: ...

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search: (similarities, keys), each (n, k); missing slots have key -1."""

    @abstractmethod
    def keys(self) -> np.ndarray:
        """Every key in the index (int64)."""

    @abstractmethod
    def reconstruct(self, key: int) -> np.ndarray | None: ...


class ScoreStore(ABC):
    """Per-song scores and the cold-start feeds (sorted by score)."""

    @abstractmethod
    def write_songs(self, songs: Sequence[SongRecord], feed: str) -> None:
        """Write records and their feed entries in one round trip; idempotent."""

    @abstractmethod
    def get_song(self, song_id: str) -> dict[str, str] | None: ...

    def get_songs(self, song_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """:meth:`get_song` of many songs, in order; backends override it with one round trip."""
        return [self.get_song(song_id) for song_id in song_ids]

    @abstractmethod
    def feed_page(self, feed: str, start: int, count: int) -> list[tuple[str, float]]:
        """(song_id, score) pairs, best first."""

    @abstractmethod
    def feed_size(self, feed: str) -> int: ...

    @abstractmethod
    def ping(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...
