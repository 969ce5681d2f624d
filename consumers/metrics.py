"""Prometheus metrics of the stream workers (served by ``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

EVENTS_IN = Counter("apexrank_worker_events_total", "Messages polled from songs.generated")
SONGS_SCORED = Counter("apexrank_worker_songs_scored_total", "Songs scored and written")
DEAD_LETTERS = Counter("apexrank_worker_dead_letters_total", "Messages sent to the dead-letter topic", ["code"])
RETRIES = Counter("apexrank_worker_retries_total", "Infrastructure failures retried", ["stage"])
RECORDS_DROPPED = Counter(
    "apexrank_records_dropped_total",
    "Output records Kafka refused for what they are (too large, invalid), even as a dead letter without its "
    "original; logged with their topic and key",
)
FEEDBACK_DEAD_LETTERS = Counter(
    "apexrank_feedback_dead_letters_total", "Engagement messages sent to engagement.dead-letter", ["code"]
)
TASTE_EVENTS = Counter(
    "apexrank_feedback_taste_events_total",
    "Engagement events by what they did to listener state: taste (moved a taste and marked the song heard), "
    "heard (marked it heard only), seen (replayed or duplicated: nothing)",
    ["outcome"],
)
TASTE_MISSING_VECTORS = Counter(
    "apexrank_feedback_taste_missing_vectors_total",
    "Likes, unlikes and skips whose song has no vector in any embedding store: counted and heard, taste unchanged",
)
COMMITS = Counter("apexrank_worker_commits_total", "Offset commits after a batch's writes landed")
SONGS_TOMBSTONED = Counter(
    "apexrank_worker_tombstoned_total", "songs.generated events skipped because the song was taken down"
)
TAKEDOWNS = Counter(
    "apexrank_worker_takedowns_total", "Embeddings removed from this worker's store by songs.deleted events"
)
SONGS_EXPIRED = Counter(
    "apexrank_worker_songs_expired_total", "Songs past retention.window_days taken off the feeds and the index"
)
ARCHIVE_BYTES = Counter("apexrank_worker_archive_bytes_total", "Bytes of expired embeddings written to the archive")
SWEEP_SECONDS = Histogram(
    "apexrank_worker_retention_sweep_seconds",
    "Wall time of one retention sweep of the worker's shard",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
BATCH_SIZE = Histogram(
    "apexrank_worker_batch_messages",
    "Messages per polled batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
STAGE_SECONDS = Histogram(
    "apexrank_worker_stage_seconds",
    "Wall time per pipeline stage and per batch",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INDEX_SIZE = Gauge("apexrank_index_vectors", "Vectors in the FAISS index")
MODEL_INFO = Info("apexrank_model", "Model version and encoder in use")
CONSUMER_LAG = Gauge(
    "apexrank_consumer_lag_messages",
    "High watermark reported by the broker minus the consumer position (where the broker reports it)",
    ["topic", "partition"],
)
DEVICE_MEMORY = Gauge("apexrank_gpu_memory_bytes", "GPU memory held by the worker's tensors", ["device", "kind"])


def observe_device_memory() -> None:
    """GPU memory gauges when torch sees a CUDA device (a no-op on CPU hosts)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        DEVICE_MEMORY.labels(str(i), "allocated").set(torch.cuda.memory_allocated(i))
        DEVICE_MEMORY.labels(str(i), "reserved").set(torch.cuda.memory_reserved(i))


# -- drift per generator (issue 17; docs/model.md, "Drift per generator") ---------------------------------
GENERATOR_SONGS = Counter(
    "apexrank_generator_songs_scored_total",
    "Songs scored per generator, and whether the serving model's training saw the generator (seen: yes, no, "
    "unknown for a model that does not record it)",
    ["generator", "seen"],
)
GENERATOR_OOD = Histogram(
    "apexrank_generator_ood_percentile",
    "The OOD percentile of the songs scored, per generator (models with an OOD model only)",
    ["generator"],
    buckets=(10, 25, 50, 75, 90, 95, 99, 100),
)
GENERATOR_SCORE = Histogram(
    "apexrank_generator_likes_score",
    "The likes score (0-100) of the songs scored, per generator: its distribution against the training "
    "songs' (apexrank_model_likes_score_quantile)",
    ["generator"],
    buckets=(5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
)
MODEL_LIKES_QUANTILE = Gauge(
    "apexrank_model_likes_score_quantile",
    "The serving model's training songs' likes score at each quantile (the card's training.score_quantiles)",
    ["quantile"],
)
#: Generator label values kept apart; past this many, further generators count as "other" (the name comes
#: from the event, so an unbounded set of names must not become an unbounded set of series).
MAX_GENERATOR_LABELS = 200
_generators: set[str] = set()


def generator_label(name: str | None) -> str:
    """``name`` as a metric label: itself for the first MAX_GENERATOR_LABELS names seen, else "other"."""
    label = name or "unknown"
    if label in _generators:
        return label
    if len(_generators) >= MAX_GENERATOR_LABELS:
        return "other"
    _generators.add(label)
    return label


def observe_scored(generator: str | None, likes: float | None, ood_percentile: float | None, seen: bool | None) -> None:
    """One scored song's drift figures, per generator."""
    label = generator_label(generator)
    GENERATOR_SONGS.labels(label, {True: "yes", False: "no", None: "unknown"}[seen]).inc()
    if ood_percentile is not None:
        GENERATOR_OOD.labels(label).observe(ood_percentile)
    if likes is not None:
        GENERATOR_SCORE.labels(label).observe(likes)


def observe_model_quantiles(training: dict[str, object] | None) -> None:
    """The serving model's training likes-score quantiles (none recorded: the gauge is cleared)."""
    from ranker.model.drift import QUANTILES

    MODEL_LIKES_QUANTILE.clear()
    quantiles = (training or {}).get("score_quantiles")
    likes = quantiles.get("likes") if isinstance(quantiles, dict) else None
    if isinstance(likes, list) and len(likes) == len(QUANTILES):
        for q, value in zip(QUANTILES, likes, strict=True):
            MODEL_LIKES_QUANTILE.labels(f"{q:g}").set(float(value))
