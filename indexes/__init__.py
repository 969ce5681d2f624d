"""Storage for apexrank: the interfaces, their backends, and factories that pick a backend by URL.

Interfaces (:mod:`indexes.base`): :class:`ScoreStore` (with :class:`AsyncScoreReads`),
:class:`EngagementCounters`, :class:`EmbeddingStore`, :class:`VectorIndex`.
Backends register by URL scheme (:func:`register_score_store`,
:func:`register_engagement_counters`); each has its own pydantic config
(``config_type``, unknown options refused) and is built with ``from_config``.
:func:`open_score_store` and :func:`open_engagement_counters` pick one by the URL's
scheme. The ranker maps its settings onto these in one place (``ranker.stores``).

The FAISS-backed classes and the backends are imported on first use, so ``import
indexes`` (and the score store) works on an install without faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from indexes.base import (
    DUPLICATE,
    NEW,
    REPLAY,
    TOMBSTONED,
    AsyncScoreReads,
    Change,
    Deletion,
    EmbeddingRecord,
    EmbeddingStore,
    EngagementCounters,
    FeedEntries,
    RemovedEmbedding,
    ScoreStore,
    SongRecord,
    StoredEmbedding,
    StoredSong,
    VectorIndex,
    faiss_id,
    message_marker,
)
from indexes.registry import open_backend
from indexes.sqlite_embeddings import KeyCollisionError, SqliteEmbeddingStore, SqliteEmbeddingStoreConfig

if TYPE_CHECKING:
    from indexes.archive import EmbeddingArchive
    from indexes.embedding_index import EmbeddingIndex, OpenReport
    from indexes.faiss_index import FaissIndexConfig, FaissVectorIndex
    from indexes.index_reader import IndexReader, ReaderStatus, ShardedIndexReader, open_index_reader
    from indexes.redis_engagement import RedisEngagementConfig, RedisEngagementCounters
    from indexes.redis_store import RedisScoreStore, RedisStoreConfig
    from indexes.segment_store import SegmentStore, SegmentStoreError
    from indexes.snapshots import SnapshotError

_LAZY = {
    "EmbeddingArchive": "indexes.archive",
    "EmbeddingIndex": "indexes.embedding_index",
    "OpenReport": "indexes.embedding_index",
    "SnapshotError": "indexes.snapshots",
    "FaissIndexConfig": "indexes.faiss_index",
    "FaissVectorIndex": "indexes.faiss_index",
    "IndexReader": "indexes.index_reader",
    "ReaderStatus": "indexes.index_reader",
    "ShardedIndexReader": "indexes.index_reader",
    "open_index_reader": "indexes.index_reader",
    "RedisEngagementConfig": "indexes.redis_engagement",
    "RedisEngagementCounters": "indexes.redis_engagement",
    "RedisScoreStore": "indexes.redis_store",
    "RedisStoreConfig": "indexes.redis_store",
    "SegmentStore": "indexes.segment_store",
    "SegmentStoreError": "indexes.segment_store",
}

#: The Redis backends' schemes: one node (redis, rediss, unix) or Redis Cluster (redis+cluster,
#: rediss+cluster: ``redis+cluster://host:port[,host:port...]``, see :mod:`indexes.redis_client`).
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
#: URL scheme -> "module:Class" of the backend serving it (imported when first opened).
_SCORE_STORES: dict[str, str] = dict.fromkeys(_REDIS_SCHEMES, "indexes.redis_store:RedisScoreStore")
_ENGAGEMENT_COUNTERS: dict[str, str] = dict.fromkeys(_REDIS_SCHEMES, "indexes.redis_engagement:RedisEngagementCounters")
#: The schemes served out of the box.
SCORE_STORE_SCHEMES = tuple(_SCORE_STORES)

__all__ = [
    "DUPLICATE",
    "NEW",
    "REPLAY",
    "SCORE_STORE_SCHEMES",
    "TOMBSTONED",
    "AsyncScoreReads",
    "Change",
    "Deletion",
    "EmbeddingArchive",
    "EmbeddingIndex",
    "EmbeddingRecord",
    "EmbeddingStore",
    "EngagementCounters",
    "FaissIndexConfig",
    "FaissVectorIndex",
    "FeedEntries",
    "IndexReader",
    "KeyCollisionError",
    "OpenReport",
    "ReaderStatus",
    "RedisEngagementConfig",
    "RedisEngagementCounters",
    "RedisScoreStore",
    "RedisStoreConfig",
    "RemovedEmbedding",
    "ScoreStore",
    "SegmentStore",
    "SegmentStoreError",
    "ShardedIndexReader",
    "SnapshotError",
    "SongRecord",
    "SqliteEmbeddingStore",
    "SqliteEmbeddingStoreConfig",
    "StoredEmbedding",
    "StoredSong",
    "VectorIndex",
    "faiss_id",
    "message_marker",
    "open_engagement_counters",
    "open_index_reader",
    "open_score_store",
    "register_engagement_counters",
    "register_score_store",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'indexes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def register_score_store(scheme: str, backend: str | type[ScoreStore]) -> None:
    """Serve ``scheme://`` URLs with ``backend`` (a :class:`ScoreStore` class, or "module:Class")."""
    _SCORE_STORES[scheme.lower()] = backend if isinstance(backend, str) else f"{backend.__module__}:{backend.__name__}"


def register_engagement_counters(scheme: str, backend: str | type[EngagementCounters]) -> None:
    """Serve ``scheme://`` URLs with ``backend`` (an :class:`EngagementCounters` class, or "module:Class")."""
    _ENGAGEMENT_COUNTERS[scheme.lower()] = (
        backend if isinstance(backend, str) else f"{backend.__module__}:{backend.__name__}"
    )


def open_score_store(
    url: str, key_prefix: str = "apexrank", socket_timeout_s: float = 5.0, **options: Any
) -> ScoreStore:
    """The score store for ``url``, chosen by its scheme (redis://, rediss://, unix://; Redis Cluster:
    redis+cluster://, rediss+cluster://).

    The options are validated by the backend's config (unknown ones are refused).
    """
    store: ScoreStore = open_backend(
        "score store", _SCORE_STORES, url, {"key_prefix": key_prefix, "socket_timeout_s": socket_timeout_s, **options}
    )
    return store


def open_engagement_counters(url: str, key_prefix: str, dedup_window_s: int, **options: Any) -> EngagementCounters:
    """The engagement counters for ``url``, chosen by its scheme (redis://, rediss://, unix://; Redis
    Cluster: redis+cluster://, rediss+cluster://).

    ``dedup_window_s``: how long an event id is remembered. Other options (``socket_timeout_s``)
    are validated by the backend's config.
    """
    counters: EngagementCounters = open_backend(
        "engagement counters",
        _ENGAGEMENT_COUNTERS,
        url,
        {"key_prefix": key_prefix, "dedup_window_s": dedup_window_s, **options},
    )
    return counters
