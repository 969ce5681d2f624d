"""Storage for apexrank: the interfaces, their backends, and factories that pick a backend by URL.

The FAISS-backed classes are imported on first use, so ``import indexes`` (and
the score store) works on an install without faiss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from indexes.base import (
    EmbeddingRecord,
    EmbeddingStore,
    ScoreStore,
    SongRecord,
    StoredEmbedding,
    VectorIndex,
    song_key,
)
from indexes.sqlite_embeddings import KeyCollisionError, SqliteEmbeddingStore, SqliteEmbeddingStoreConfig

if TYPE_CHECKING:
    from indexes.embedding_index import EmbeddingIndex, OpenReport, SnapshotError
    from indexes.faiss_index import FaissIndexConfig, FaissVectorIndex
    from indexes.redis_store import RedisScoreStore, RedisStoreConfig

SCORE_STORE_SCHEMES = ("redis", "rediss", "unix")

_LAZY = {
    "EmbeddingIndex": "indexes.embedding_index",
    "OpenReport": "indexes.embedding_index",
    "SnapshotError": "indexes.embedding_index",
    "FaissIndexConfig": "indexes.faiss_index",
    "FaissVectorIndex": "indexes.faiss_index",
    "RedisScoreStore": "indexes.redis_store",
    "RedisStoreConfig": "indexes.redis_store",
}

__all__ = [
    "SCORE_STORE_SCHEMES",
    "EmbeddingIndex",
    "EmbeddingRecord",
    "EmbeddingStore",
    "FaissIndexConfig",
    "FaissVectorIndex",
    "KeyCollisionError",
    "OpenReport",
    "RedisScoreStore",
    "RedisStoreConfig",
    "ScoreStore",
    "SnapshotError",
    "SongRecord",
    "SqliteEmbeddingStore",
    "SqliteEmbeddingStoreConfig",
    "StoredEmbedding",
    "VectorIndex",
    "open_score_store",
    "song_key",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'indexes' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def open_score_store(url: str, key_prefix: str = "apexrank", socket_timeout_s: float = 5.0) -> ScoreStore:
    """The score store for ``url``, chosen by its scheme (redis://, rediss://, unix://)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in SCORE_STORE_SCHEMES:
        from indexes.redis_store import RedisScoreStore, RedisStoreConfig

        config = RedisStoreConfig(url=url, key_prefix=key_prefix, socket_timeout_s=socket_timeout_s)
        return RedisScoreStore(config)
    supported = ", ".join(f"{s}://" for s in SCORE_STORE_SCHEMES)
    shown = f"{scheme}://" if scheme else "(none)"  # never echo the URL: it may hold a password
    raise ValueError(f"unsupported score store URL scheme {shown}: use {supported}")
