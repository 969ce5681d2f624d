"""Every store the ranker and the consumers use, built from :class:`~ranker.settings.Settings` in one place.

``indexes`` cannot see the settings (it is the bottom layer), so this module maps
them, once, onto the backends' own configs: the URL picks the backend
(:func:`indexes.open_score_store`), and the backend's config validates the rest.
Callers never construct a backend themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexes import EngagementCounters, ScoreStore, open_engagement_counters, open_score_store

if TYPE_CHECKING:
    from indexes.arms import ArmStore
    from indexes.embedding_index import EmbeddingIndex
    from indexes.index_reader import IndexReader, ShardedIndexReader
    from indexes.listeners import ListenerStore
    from ranker.settings import Settings


def score_store(settings: Settings) -> ScoreStore:
    """The score and feed store (``redis.*``)."""
    redis = settings.redis
    return open_score_store(
        redis.url.get_secret_value(),
        key_prefix=redis.key_prefix,
        socket_timeout_s=redis.socket_timeout_s,
        tombstone_retention_s=redis.tombstone_retention_s,
    )


def engagement_counters(settings: Settings) -> EngagementCounters:
    """The feedback consumer's deduplicated engagement counters (``redis.*``, ``feedback.dedup_window_s``)."""
    redis = settings.redis
    return open_engagement_counters(
        redis.url.get_secret_value(),
        key_prefix=redis.key_prefix,
        dedup_window_s=settings.feedback.dedup_window_s,
        socket_timeout_s=redis.socket_timeout_s,
        orphan_ttl_s=settings.feedback.orphan_ttl_s,
        examination_refresh_s=settings.examination.refresh_s,
    )


def listener_store(settings: Settings) -> ListenerStore:
    """Listener taste and heard sets (``listeners.*``, ``redis.*``, ``feedback.dedup_window_s``); the null store
    when ``listeners.enabled`` is off, or is unset and no index path is configured (taste needs the vectors)."""
    from indexes.listeners import NullListenerStore, open_listener_store

    listeners, redis = settings.listeners, settings.redis
    enabled = listeners.enabled
    if enabled is None:
        enabled = settings.index.path is not None or bool(settings.index.shards)
    if not enabled:
        return NullListenerStore()
    return open_listener_store(
        redis.url.get_secret_value(),
        key_prefix=redis.key_prefix,
        socket_timeout_s=redis.socket_timeout_s,
        dedup_window_s=settings.feedback.dedup_window_s,
        half_life_s=listeners.half_life_days * 86400.0,
        skip_weight=listeners.skip_weight,
        heard_max=listeners.heard_max,
        heard_ttl_s=listeners.heard_ttl_s,
        taste_ttl_s=listeners.taste_ttl_s,
    )


def arm_store(settings: Settings) -> ArmStore:
    """A/B arms' totals (``arms.*``, ``redis.*``, ``feedback.dedup_window_s``); the null store when no arms
    are configured."""
    from indexes.arms import NullArmStore, open_arm_store

    if not settings.arms.arms:
        return NullArmStore()
    redis = settings.redis
    return open_arm_store(
        redis.url.get_secret_value(),
        key_prefix=redis.key_prefix,
        experiment=settings.arms.experiment,
        socket_timeout_s=redis.socket_timeout_s,
        dedup_window_s=settings.feedback.dedup_window_s,
    )


def embedding_index(settings: Settings, dim: int) -> EmbeddingIndex:
    """The worker's embedding index (``index.*``) for vectors of ``dim`` (the encoder's ``vector_dim``)."""
    from indexes.embedding_index import EmbeddingIndex  # FAISS: imported only where an index is used

    index = settings.index
    return EmbeddingIndex(
        settings.index_dir,
        dim=dim,
        factory=index.factory,
        expected_size=index.expected_size,
        nprobe=index.nprobe,
        use_gpu=index.use_gpu,
        snapshot_every_songs=index.snapshot_every_songs,
        snapshot_every_s=index.snapshot_every_s,
    )


def index_reader(settings: Settings) -> IndexReader | ShardedIndexReader:
    """The API's read-only view of the workers' indexes: one directory, or one per shard (``index.shards``)."""
    from indexes.index_reader import open_index_reader

    globbed = any(c in pattern for pattern in settings.index.shards for c in "*?[")
    return open_index_reader(
        settings.index_shards,
        settings.index.factory,
        expected_size=settings.index.expected_size,
        nprobe=settings.index.nprobe,
        # a glob finds the shards of workers started later (scale-out) at every refresh
        discover=(lambda: settings.index_shards) if globbed else None,
    )
