"""Every setting apexrank reads, with its default, in one place.

Values come from (highest priority first): explicit arguments, environment
variables prefixed ``APEXRANK_`` (nested fields joined with ``__``, e.g.
``APEXRANK_KAFKA__BOOTSTRAP_SERVERS``), an optional TOML file named by
``APEXRANK_CONFIG`` (or ``--config`` on the command line), then the defaults
below. The defaults point at the embedded stack that ``apexrank services up``
starts, so a fresh checkout works with no configuration at all.
"""

from __future__ import annotations

import glob
import math
import os
import re
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ranker.events import TASKS

DEFAULT_KAFKA_PORT = 19092
DEFAULT_REDIS_PORT = 16379


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopicSettings(_Section):
    """Kafka topic names."""

    songs_generated: str = "songs.generated"
    songs_scored: str = "songs.scored"
    dead_letter: str = "songs.dead-letter"
    engagement: str = "engagement"
    engagement_dead_letter: str = "engagement.dead-letter"
    models_promoted: str = "models.promoted"
    feeds_served: str = Field(
        "feeds.served",
        description="What the API served: one record per feed or rank response (items, positions, explored, "
        "propensities, arm); the feedback consumer logs it beside the engagement log.",
    )
    songs_deleted: str = Field(
        "songs.deleted",
        description="Takedowns (DELETE /v1/songs/{id}, apexrank songs delete); the workers drop the vectors.",
    )
    songs_retry: str = Field(
        "",
        description="Where the worker parks songs whose audio fetch failed transiently until their next "
        "attempt (worker.fetch_*); empty: songs_generated + '.retry' (songs.generated.retry).",
    )
    partitions: int = Field(3, ge=1, description="Partitions used when apexrank creates a topic itself.")
    replication_factor: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _default_retry_topic(self) -> TopicSettings:
        if not self.songs_retry:
            self.songs_retry = f"{self.songs_generated}.retry"
        return self


class KafkaSettings(_Section):
    """Kafka client settings (any Kafka-protocol broker)."""

    bootstrap_servers: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    worker_group_id: str = "apexrank-worker"
    feedback_group_id: str = "apexrank-feedback"
    # Small session timeouts keep group joins fast; Tansu's join takes about half of it.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(2000, ge=100)
    max_poll_interval_ms: int = Field(600_000, ge=10_000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    request_timeout_ms: int = Field(30_000, ge=1000)
    max_request_size: int = Field(
        1_048_576,
        ge=65_536,
        description="Largest record batch the producers send (bytes); keep it at or below the broker's "
        "message.max.bytes and the topics' max.message.bytes.",
    )
    dead_letter_original_bytes: int = Field(
        65_536,
        ge=0,
        description="Most bytes of a failed message's value embedded in its dead letter; the full length and "
        "sha256 are always given, so the original can be matched in the source topic.",
    )
    auto_create_topics: bool = Field(True, description="Create missing topics at start-up.")
    topics: TopicSettings = TopicSettings()

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments shared by kafka-python clients."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_list,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kw


class RedisSettings(_Section):
    """Score and feed store."""

    url: SecretStr = Field(
        SecretStr(f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"),
        description="One node: redis://, rediss:// (TLS) or unix://. Redis Cluster (redis-py's RedisCluster, "
        "following MOVED/ASK): redis+cluster://[user:password@]host:port[,host:port...] or rediss+cluster://; "
        "each host is a startup node, and there is only database 0.",
    )
    key_prefix: str = "apexrank"
    socket_timeout_s: float = Field(5.0, gt=0)
    tombstone_retention_s: float | None = Field(
        None,
        gt=0,
        description="How long a taken-down song's tombstone is kept (a replay within it stays a no-op); None: forever.",
    )


class IndexSettings(_Section):
    """FAISS index of song embeddings and the durable embedding store behind it."""

    path: Path | None = Field(None, description="Index directory; default STATE_DIR/index.")
    factory: str = Field(
        "auto",
        description="faiss.index_factory string (wrapped in an ID map when needed), or 'auto': picked by "
        "expected_size when the index is created (an existing index keeps its type): Flat up to 100k "
        "vectors, IVF<~4*sqrt(N)>,Flat up to 1M, IVF<~4*sqrt(N)>,SQ8 beyond, nprobe nlist/64; never "
        "HNSW (it cannot remove). The table and the measurements at 1M: docs/indexes.md.",
    )
    expected_size: int | None = Field(
        None,
        ge=0,
        description="Vectors one index directory (one worker shard) is expected to hold, for factory 'auto'; "
        "default: what the embedding store holds when the index is built.",
    )
    use_gpu: Literal["auto", "never", "always"] = "auto"
    nprobe: int | None = Field(
        None,
        ge=1,
        description="IVF lists one query visits, in the workers' indexes and the API's readers (recall against "
        "speed: docs/indexes.md); None: the index's own (auto: nlist/64, kept in the FAISS file).",
    )
    snapshot_every_songs: int = Field(
        1000, ge=1, description="Snapshot the FAISS index after this many changes, or a tenth of the index if more."
    )
    snapshot_every_s: float = Field(60.0, gt=0)
    shards: list[str] = Field(
        [],
        description="Index directories (glob patterns allowed) the API searches and merges, one per worker; "
        "default: the index path alone.",
    )


class AudioSettings(_Section):
    """Fetching and decoding newly generated audio."""

    sample_rate: int = 24_000
    segment_s: float = Field(30.0, gt=0)
    min_duration_s: float = Field(1.0, ge=0)
    max_duration_s: float = Field(600.0, gt=0, description="Longer songs are scored on their first part only.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(15.0, gt=0)
    silence_rms: float = Field(1e-4, ge=0, description="Mean RMS below this (about -80 dBFS) is silence.")
    file_root: Path | None = Field(None, description="If set, file:// URIs must resolve inside it.")
    allowed_schemes: list[str] = ["file", "http", "https"]
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="http(s) hosts that may be fetched: exact names or '*.suffix' (any subdomain of suffix). "
        "Empty: any public host.",
    )
    allow_private_networks: bool = Field(
        False,
        description="Let http(s) fetches reach loopback, private, link-local, CGNAT and other non-public "
        "addresses. For development and tests only: it re-opens SSRF to internal services.",
    )
    max_redirects: int = Field(3, ge=0, description="Redirects followed per fetch; each hop is re-checked.")
    max_sample_rate: int = Field(
        48_000,
        ge=1,
        description="Audio declaring a higher sample rate is refused (bounds decode cost; 192000 for hi-res masters).",
    )


class ModelSettings(_Section):
    """The MERT encoder weights and the APEX head."""

    mert_model: str = Field("m-a-p/MERT-v1-95M", description="Hub id or local directory of MERT weights.")
    offline: bool = Field(False, description="Never contact the Hub (HF_HUB_OFFLINE=1 also sets this).")
    layers: list[int] = [2, 5, 8, 12]
    head_dir: Path | None = Field(None, description="APEX head directory; default STATE_DIR/models/current.")
    seed: int = 42
    allow_untrained: bool = Field(
        False,
        description="Let the worker score with the untrained head seeded by model.seed when no trained head is "
        "promoted (tests, plumbing benchmarks). Off, the worker refuses to start: its scores would be noise.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # MERT speed options (ranker.encoders.mert.SpeedOptions says what each does).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="MERT attention kernel; flash_attention_2 needs flash-attn and CUDA (sdpa on the CPU)."
    )
    half_weights: bool = Field(
        False, description="Cast MERT to the bf16/fp16 precision end to end instead of autocast (CUDA, or explicit)."
    )
    bucket_s: list[float] = Field(
        [], description="Padded MERT batch widths in seconds (e.g. 10,20,30): few shapes; empty: whole seconds on CUDA."
    )
    compile: Literal["off", "dynamic", "static", "cudagraphs"] = Field("off", description="torch.compile MERT.")
    pin_memory: bool = Field(False, description="Pinned host buffers and non-blocking copies (CUDA only).")
    logmel_n_mels: int = Field(96, ge=8)
    ood_flag_percentile: float = Field(
        95.0,
        ge=0.0,
        le=100.0,
        description="A song whose OOD percentile (share of held-out training songs nearer the training "
        "distribution) is above this is flagged out of distribution (issue 17; docs/model.md).",
    )


class WorkerSettings(_Section):
    """The scoring worker's batching and retry behaviour."""

    max_poll_records: int = Field(64, ge=1)
    poll_timeout_ms: int = Field(500, ge=10)
    encoder_batch_segments: int = Field(8, ge=1)
    fetch_threads: int = Field(4, ge=1)
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(15.0, gt=0)
    fetch_max_attempts: int = Field(
        5,
        ge=1,
        description="Tries of a song whose audio fetch fails transiently (5xx, 429, timeout, refused or reset "
        "connection), or whose encode runs out of device memory, before its dead letter; 1: no retry.",
    )
    fetch_backoff_initial_s: float = Field(
        10.0, gt=0, description="Wait before the second try; it doubles per try up to fetch_backoff_max_s."
    )
    fetch_backoff_max_s: float = Field(300.0, gt=0, description="Longest wait between two tries of one song.")
    model_check_s: float = Field(10.0, gt=0, description="How often the worker looks for a newly promoted head.")
    max_batch_audio_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Decoded audio (float32 waveforms) one batch holds at once; songs past it wait for the "
        "encoder to release what came before them (docs/security.md, worst case).",
    )
    pipelined: bool = Field(
        True,
        description="Fetch/decode in fetch_threads pool threads while the encoder works on songs already decoded "
        "(consumers.worker_stages); false: one polled batch at a time, decode and encoder in turn.",
    )
    pipeline_songs: int = Field(
        512,
        ge=1,
        description="Pipelined: songs polled and not yet written (waiting, decoding, or ready for the encoder); "
        "decodes start only while max_batch_audio_bytes holds their worst case. GPU host: about 4 groups.",
    )
    group_songs: int = Field(
        128,
        ge=1,
        description="Pipelined: songs the encoder takes at once (one write and commit each); pipeline_songs should "
        "hold a few groups, so that the next ones decode while one is encoded. GPU host: 256.",
    )
    group_deadline_ms: int = Field(
        100,
        ge=0,
        description="Pipelined: the encoder takes a short group once its oldest ready song has waited this long.",
    )
    stop_drain_s: float = Field(
        20.0,
        ge=0,
        description="Pipelined: on SIGTERM, how long the songs already polled go on through the stages (no new "
        "polls) so their offsets commit; what is left then is read again. Keep it well under the pod's grace period.",
    )
    created_at_max_skew_s: float = Field(
        300.0, ge=0, description="A song's created_at may be at most this far in the future (clock skew)."
    )
    created_at_min: datetime = Field(
        datetime(2020, 1, 1, tzinfo=UTC), description="A song's created_at may not be earlier than this."
    )


class RetrainSettings(_Section):
    """The periodic retraining job (``apexrank retrain``)."""

    min_plays: int = Field(20, ge=1, description="Exposure threshold: songs with fewer plays are left out.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Newest songs held out to compare models.")
    margin: float = Field(0.01, ge=0, description="Mean Spearman(streams, likes) gain needed to promote.")
    keep_models: int = Field(
        5,
        ge=1,
        description="Model versions the job keeps of those it made (the newest; the serving one always): each "
        "run deletes the older ones, and what a save cut short left behind.",
    )
    warm_start: bool = Field(True, description="Start the candidate from the current head (else from scratch).")
    targets: Literal["exposure", "counts"] = Field(
        "exposure",
        description="exposure: the likes target is a song's smoothed like rate x the median plays (what the audience "
        "decided, not where the feed placed it); counts: raw play and like counts.",
    )
    rate_prior_plays: float = Field(
        20.0, ge=0, description="Exposure targets: like rates are smoothed toward the pooled rate by this many plays."
    )
    likes_model: Literal["readout", "head"] = Field(
        "readout",
        description="readout: the candidate's likes output is a ridge-penalised logistic read-out of the embedding, "
        "fitted on plays and likes (ranker.model.readout); head: the retrained head's own likes output.",
    )
    min_songs_head: int = Field(
        1000,
        ge=0,
        description="likes_model=readout: with fewer training songs a trained head is not fine-tuned; the candidate "
        "is the current head with a new likes read-out (so the gate is decided by likes: a gain of 2 x margin).",
    )
    epochs: int = Field(30, ge=1)
    patience: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, description="The candidate's learning rate (TrainConfig's default).")
    batch_size: int = Field(
        512, ge=2, description="The candidate's batch; a few hundred songs want 32 (512 is one step an epoch)."
    )
    cold_start_window_h: float = Field(72.0, gt=0, description="Songs this young are rescored on promotion.")
    rescore_grace_s: float | None = Field(
        None,
        ge=0,
        description="After a promotion's rescore, wait this long from the promotion, then rescore again the window's "
        "songs a worker still scored with the previous head (it looks for a new one every worker.model_check_s, "
        "between batches). Default: 2 x worker.model_check_s + 5 s; 0: no second pass (the next run's sweep "
        "rescores them).",
    )
    generator_calibration_tolerance: float = Field(
        0.05,
        ge=0,
        description="The generators' calibration factors are stored, and the feeds rebuilt, when one moved by more "
        "than this (relative) since the last run (feed.like_rate.generator_calibration).",
    )
    off_policy_gate: bool = Field(
        True,
        description="A candidate that passes the Spearman gate must also be liked more off-policy: on the served "
        "log's exploration slots, the paired difference of its picks' and the incumbent's like rates must have its "
        "interval above 0 (docs/off-policy.md). False: the Spearman gate alone.",
    )
    off_policy_min_matched: int = Field(
        200, ge=1, description="Matched explored impressions each side needs before the off-policy gate can pass."
    )
    off_policy_window_days: float = Field(7.0, gt=0, description="How much of the served log the gate reads.")
    pushgateway_url: str = Field(
        "",
        description="Prometheus Pushgateway (e.g. http://pushgateway:9091) each run pushes its figures to, "
        "job apexrank_retrain; empty: no push. A failed push is logged, never fails the run.",
    )


class FeedbackSettings(_Section):
    """The engagement (feedback) consumer."""

    max_poll_records: int = Field(
        10000,
        ge=1,
        description="Events per batch: each batch costs one log file per partition (fsync) and a few Redis calls.",
    )
    poll_timeout_ms: int = Field(500, ge=10)
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(15.0, gt=0)
    dedup_window_s: int = Field(7 * 24 * 3600, ge=60, description="How long an event_id is remembered.")
    ts_max_skew_s: float = Field(
        300.0,
        ge=0,
        description="An engagement event's ts may be at most this far in the future (clock skew); a later one is "
        "dead-lettered (invalid_ts), and POST /v1/events rejects it.",
    )
    ts_min: datetime = Field(
        datetime(2020, 1, 1, tzinfo=UTC), description="An engagement event's ts may not be earlier than this."
    )
    orphan_ttl_s: int | None = Field(
        30 * 24 * 3600,
        ge=60,
        description="Engagement for a song with no record in Redis (not scored yet, or its retained history "
        "expired) starts a counters-only hash that expires this long after unless the song is scored "
        "meanwhile; None: kept for ever. Longer than a dead letter may wait for its replay.",
    )
    log_dir: Path | None = Field(
        None,
        description="Engagement log (Parquet, by day); default STATE_DIR/engagement. Shared by the group.",
    )
    served_log_dir: Path | None = Field(
        None,
        description="Served log (feeds.served as Parquet, by day); default STATE_DIR/served. Shared by the group.",
    )


class RetentionSettings(_Section):
    """When a song leaves the hot path: the feeds, the FAISS index and the embedding store (issue 15)."""

    window_days: float | None = Field(
        None,
        gt=0,
        description="A song scored longer ago than this leaves every feed and the index; its hash keeps only what "
        "the engagement history needs, its embedding moves to the archive. None: keep everything. Production "
        "example: 30.",
    )
    history_days: float | None = Field(
        None,
        gt=0,
        description="How long an expired song's shrunk hash (its engagement counters, calibration claims, cohort) "
        "stays in Redis after it expired; None: for ever (Redis then grows by about 400 bytes an expired song). "
        "The archive and the engagement log keep what retraining needs either way.",
    )
    sweep_every_s: float = Field(3600.0, gt=0, description="How often a worker sweeps its own shard.")
    batch: int = Field(1000, ge=1, le=100_000, description="Songs expired per step of a sweep.")
    archive_dir: Path | None = Field(
        None, description="Where expired embeddings go (Parquet, one file per sweep step); default INDEX_DIR/archive."
    )
    deletions_keep_s: float = Field(
        86400.0,
        ge=60,
        description="How long the embedding store keeps deletion records for index readers catching up; one further "
        "behind reloads whole.",
    )
    engagement_log_days: float | None = Field(
        None, gt=0, description="Engagement log day folders older than this are deleted; None: keep."
    )


DEFAULT_FEED = "cold-start"
# Feed names sit in Redis hash tags and URL paths: the same alphabet as song ids.
_FEED_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


#: Bounds on policy numbers (also inline ones sent to the API): far past any useful value, far
#: below where the score's sums, logs and exponentials stop being finite.
MAX_WEIGHT = 1e6
MAX_HALF_LIFE_HOURS = 1e6
MAX_PRIOR_STRENGTH = 1e15  # the loop simulation's prior-only policy uses 1e12


def _default_weights() -> dict[str, float]:
    return {
        "streams": 0.35,
        "likes": 0.35,
        "coherence": 0.06,
        "musicality": 0.06,
        "memorability": 0.06,
        "clarity": 0.06,
        "naturalness": 0.06,
    }


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Weights over the seven APEX tasks: known names, finite, >= 0, not all zero."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; weights take {list(TASKS)}")
    bad = [t for t, w in weights.items() if not (math.isfinite(w) and 0 <= w <= MAX_WEIGHT)]
    if bad:
        raise ValueError(f"weights must be finite and in [0, {MAX_WEIGHT:g}] (scores are logged), got {bad}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("at least one weight must be > 0")
    return weights


class FeedFilters(_Section):
    """Which songs a feed holds.

    Generator, tag and duration filters decide membership when a song is written;
    the age window is applied when a page is read (a song ages into and out of it).
    """

    generators_include: list[str] = Field(default_factory=list, description="Empty: every generator.")
    generators_exclude: list[str] = Field(default_factory=list)
    tags_any: list[str] = Field(default_factory=list, description="Empty: any; else at least one of these.")
    tags_exclude: list[str] = Field(default_factory=list)
    min_age_hours: float = Field(0.0, ge=0)
    max_age_hours: float | None = Field(None, gt=0, description="Older songs leave the feed.")
    min_duration_s: float | None = Field(None, ge=0, description="Songs of unknown duration fail this filter.")

    @model_validator(mode="after")
    def _check_window(self) -> FeedFilters:
        if self.max_age_hours is not None and self.max_age_hours <= self.min_age_hours:
            raise ValueError("max_age_hours must be greater than min_age_hours")
        return self


class FeedPolicy(_Section):
    """One named feed: how songs are scored, which songs it holds, how a page is assembled.

    The scoring formula is documented in docs/ranking.md.
    """

    weights: dict[str, float] = Field(
        default_factory=_default_weights,
        description="Weights over the seven APEX tasks; streams+likes weigh the like-rate posterior.",
    )
    half_life_hours: float | None = Field(
        72.0,
        ge=0,
        le=MAX_HALF_LIFE_HOURS,
        description="Freshness: a song's score halves every this many hours; 0 or null: no decay.",
    )
    prior_strength: float = Field(
        20.0, gt=0, le=MAX_PRIOR_STRENGTH, description="w: how many plays the model's predicted like rate is worth."
    )
    uncertain_prior: bool = Field(
        True,
        description="A song whose model gives a spread of its like rate (an ensemble) gets w = p0 (1 - p0) / spread^2"
        " - 1, within [prior_strength_min, prior_strength]: uncertain songs yield to evidence sooner.",
    )
    prior_strength_min: float = Field(
        2.0, gt=0, le=MAX_PRIOR_STRENGTH, description="The least w an uncertain or out-of-distribution song gets."
    )
    ood_prior_factor: float = Field(
        0.25, gt=0, le=1, description="w times this for a song the model flags out of its training distribution."
    )
    explore_share: float = Field(
        0.1, ge=0, le=0.5, description="Share of each page's slots filled by Thompson sampling."
    )
    explore_pool: int = Field(
        20, ge=1, le=500, description="How many songs past the exploit slots exploration draws from."
    )
    max_per_generator: int | None = Field(None, ge=1, description="Diversity: at most this many per page.")
    dedup_threshold: float | None = Field(
        0.97, gt=0, le=1, description="Cosine above which a song is a near-duplicate of one placed above it."
    )
    filters: FeedFilters = Field(default_factory=FeedFilters)
    evidence: Literal["position", "plain"] = Field(
        "position",
        description="position: a play shown at position k counts as the examination weight of k (estimated from "
        "the served log; 1 until estimated) in the posterior's plays; plain: every play counts 1.",
    )

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value)


class LikeRatePrior(_Section):
    """The prior like rate p0 of a song with no plays, and its calibration.

    With a target transform in the model directory, p0 is ``TargetTransform.expected_rate``;
    without one, the likes score maps linearly onto [rate_min, rate_max]. The same range
    maps like rates back onto the 0-1 scale the feed score blends (docs/ranking.md).
    """

    rate_min: float = Field(0.005, ge=0, lt=1, description="Like rate of a likes score of 0.")
    rate_max: float = Field(0.25, gt=0, le=1, description="Like rate of a likes score of 100.")
    calibrate: bool = Field(True, description="Scale p0 by observed likes / predicted likes.")
    calibration_strength: float = Field(
        50.0, ge=0, description="Pseudo-count of predicted likes that holds the scale at 1 early on."
    )
    calibration_min: float = Field(0.25, gt=0)
    calibration_max: float = Field(4.0, gt=0)
    generator_calibration: bool = Field(
        True,
        description="apexrank retrain also fits each generator's own factor on the scale, shrunk toward 1 by its "
        "evidence (docs/ranking.md, 'Calibration per generator').",
    )
    generator_calibration_strength: float = Field(
        30.0, ge=0, description="Pseudo-count of predicted likes that holds a generator's factor at 1."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> LikeRatePrior:
        if self.rate_max <= self.rate_min:
            raise ValueError("rate_max must be greater than rate_min")
        if self.calibration_max < self.calibration_min:
            raise ValueError("calibration_max must be >= calibration_min")
        return self


class FeedSettings(_Section):
    """Named feed policies; ``name`` is the default feed (``cold-start`` exists out of the box)."""

    name: str = Field(DEFAULT_FEED, description="The default feed (also what songs.scored rank_score uses).")
    feeds: dict[str, FeedPolicy] = Field(default_factory=lambda: {DEFAULT_FEED: FeedPolicy()})
    like_rate: LikeRatePrior = Field(default_factory=LikeRatePrior)
    taste_weight: float = Field(
        1.0,
        ge=0,
        description="Personal feeds (?user=): the taste term's weight in log-score space; a cosine of 1 at full "
        "evidence multiplies a song's score by e^taste_weight (docs/ranking.md, 'Personal feeds'). 0: no blend.",
    )
    taste_evidence_half: float = Field(
        5.0, gt=0, description="Taste evidence (about: likes) at which the taste term has half its weight."
    )

    @model_validator(mode="after")
    def _check_feeds(self) -> FeedSettings:
        if self.name == DEFAULT_FEED and DEFAULT_FEED not in self.feeds:
            self.feeds = {DEFAULT_FEED: FeedPolicy(), **self.feeds}
        bad = [n for n in self.feeds if not _FEED_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"feed names must be 1-64 letters, digits or ._:-, got {bad}")
        if self.name not in self.feeds:
            raise ValueError(f"the default feed {self.name!r} is not among feeds {sorted(self.feeds)}")
        return self

    @property
    def default(self) -> FeedPolicy:
        return self.feeds[self.name]

    @property
    def weights(self) -> dict[str, float]:
        """The default feed's weights (what the worker's rank_score blends)."""
        return self.default.weights


class ApiSettings(_Section):
    """The HTTP API that recommender backends call (``apexrank serve``)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tokens: list[SecretStr] = Field(
        default_factory=list, description="Bearer tokens accepted; empty: no authentication."
    )
    admin_tokens: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer tokens that may take songs down (DELETE /v1/songs/{id}); read tokens cannot. "
        "Empty: takedown through the API is off (403).",
    )
    max_limit: int = Field(200, ge=1, le=1000, description="Largest feed page.")
    max_candidates: int = Field(500, ge=1, le=10_000, description="Largest POST /v1/rank candidate list.")
    max_k: int = Field(100, ge=1, le=1000, description="Most similar songs one request may ask for.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_events_per_request: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Most engagement events one POST /v1/events may carry (413 too_many_events beyond); "
        "max_body_bytes bounds the body too (about 150-250 bytes an event).",
    )
    index_refresh_s: float = Field(
        10.0, gt=0, description="How often the API applies new embedding-store records to its index."
    )
    calibration_ttl_s: float = Field(5.0, ge=0, description="How long the API caches the calibration scale.")
    page_cache_ttl_s: float = Field(
        0.0,
        ge=0,
        description="How long a feed window (songs, scores, vectors) is reused for the same page; 0: off. Pages "
        "from the song table cost well under a millisecond; a cache adds up to this much staleness.",
    )
    page_cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Memory the page cache may hold per API process; oldest entries go first."
    )
    max_filter_values: int = Field(
        32, ge=1, le=1000, description="Most generator= or tag= values one feed or rank request may filter by."
    )
    max_exclude: int = Field(
        200, ge=1, le=10_000, description="Most song ids one feed or rank request may exclude (exclude=)."
    )
    filter_scan_rows: int = Field(
        20_000,
        ge=100,
        description="Most feed rows one filtered page scans: a page whose filters pass fewer songs in that "
        "stretch is short, and its cursor resumes after it.",
    )
    personal_window: int = Field(
        200,
        ge=1,
        le=400,
        description="Personal feeds: how many of the feed's eligible songs (after filters and heard ones) are "
        "re-ordered by the taste blend; below them, the feed's own order. At most 400: the window's songs served "
        "out of order ride in the cursor's skip set (512 keys).",
    )
    served_log: bool = Field(
        True,
        description="Record every feed and rank response served (feeds.served, docs/served-log.md): a spool file "
        "line before the response, shipped to Kafka by a thread.",
    )
    served_spool_dir: Path | None = Field(
        None,
        description="Where the served records wait for Kafka (one file per process); default STATE_DIR/served-spool.",
    )
    served_ship_interval_s: float = Field(0.5, gt=0, description="How often the shipper sends new served records.")
    served_spool_max_bytes: int = Field(
        1 << 30,
        ge=1 << 16,
        description="Most bytes of served records waiting in the spool (Kafka down); beyond it new ones are dropped "
        "and counted (apexrank_api_served_dropped_total), never blocking a response.",
    )
    table_startup_wait_s: float = Field(
        30.0,
        ge=0,
        description="How long start-up waits for the song table before accepting requests; a larger catalog "
        "keeps loading after it (feeds and rank answer 503, /readyz is false, /healthz answers).",
    )
    table_poll_s: float = Field(
        0.5,
        gt=0,
        le=30,
        description="Longest wait of one read of the store's change log by the song table (a blocking read: "
        "changes are applied as they arrive, not once per poll).",
    )


class ListenerSettings(_Section):
    """Listener taste and heard sets, kept by the feedback consumer (issue 16; docs/listeners.md)."""

    enabled: bool | None = Field(
        None,
        description="Keep each user's taste and heard set in Redis. None: on when an index path (index.path or "
        "index.shards) is configured, since taste needs the songs' vectors from the embedding stores.",
    )
    skip_weight: float = Field(
        0.25, ge=0, description="A skip adds -skip_weight times the song's unit vector to the taste (a like adds +1)."
    )
    half_life_days: float = Field(30.0, gt=0, description="Event-time half-life of a taste event's weight.")
    heard_max: int = Field(2000, ge=1, description="Songs kept per user's heard set (the most recent).")
    heard_ttl_s: int = Field(90 * 24 * 3600, ge=1, description="A heard set expires this long after its last write.")
    taste_ttl_s: int | None = Field(
        365 * 24 * 3600, ge=1, description="A taste expires this long after its last change; None: never."
    )


class ExaminationSettings(_Section):
    """Position-aware evidence: how likely a listener is to examine each page position (docs/ranking.md).

    Estimated from the explored (randomly placed) slots of the served log joined with engagement, refreshed
    by ``apexrank retrain``; the feedback consumer weighs each play by it.
    """

    max_position: int = Field(50, ge=1, le=1000, description="Positions estimated; deeper ones share the last's.")
    min_impressions: int = Field(
        200, ge=1, description="Explored impressions needed before a weight is estimated; until then every weight is 1."
    )
    floor: float = Field(0.05, gt=0, le=1, description="Smallest weight: bounds what one play at depth can count.")
    window_days: float = Field(14.0, gt=0, description="How far back the served and engagement logs are read.")
    refresh_s: float = Field(60.0, gt=0, description="How often a feedback consumer re-reads the stored weights.")


class Arm(_Section):
    """One arm of an A/B test: the feed policy and model version its users get."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")
    feed: str = Field(description="A feed policy of feed.feeds that serves this arm's users.")
    model_version: str | None = Field(
        None, description="The model version the arm is meant to be scored by (recorded in the served log)."
    )
    weight: float = Field(1.0, gt=0, description="Share of users, relative to the other arms' weights.")


class ArmsSettings(_Section):
    """A/B arms: each user is hashed (with ``experiment`` as salt) into one arm, stably (docs/arms.md)."""

    experiment: str = Field(
        "default", min_length=1, max_length=64, description="Salt of the user hash: a new name reshuffles users."
    )
    feed: str | None = Field(None, description="The feed whose personal requests are split; None: the default feed.")
    arms: list[Arm] = Field(default_factory=list, description="Empty: no experiment.")

    @field_validator("arms")
    @classmethod
    def _unique_names(cls, value: list[Arm]) -> list[Arm]:
        names = [arm.name for arm in value]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique: {names}")
        return value


class Settings(BaseSettings):
    """apexrank's effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix="APEXRANK_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    state_dir: Path = Field(Path(".apexrank"), description="Pid files, logs, index and models.")
    dev_mode: bool = Field(
        False,
        description="Development (the demo, tests): file:// audio is read with no audio.file_root, with a warning. "
        "Otherwise the worker refuses to start with 'file' allowed and no file_root.",
    )
    encoder: Literal["mert", "logmel"] = Field("mert", description="logmel needs no weights (baseline/demo).")
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    index: IndexSettings = IndexSettings()
    audio: AudioSettings = AudioSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    retrain: RetrainSettings = RetrainSettings()
    feed: FeedSettings = FeedSettings()
    api: ApiSettings = ApiSettings()
    retention: RetentionSettings = RetentionSettings()
    listeners: ListenerSettings = ListenerSettings()
    examination: ExaminationSettings = ExaminationSettings()
    arms: ArmsSettings = ArmsSettings()

    @model_validator(mode="after")
    def _arms_name_feeds(self) -> Settings:
        known = set(self.feed.feeds)
        wanted = [arm.feed for arm in self.arms.arms] + ([self.arms.feed] if self.arms.feed else [])
        unknown = sorted({name for name in wanted if name not in known})
        if unknown:
            raise ValueError(f"arms name feeds that feed.feeds does not define: {unknown}; known: {sorted(known)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("APEXRANK_CONFIG")
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"APEXRANK_CONFIG names {path}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # Derived paths -----------------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return self.index.path or self.state_dir / "index"

    @property
    def index_shards(self) -> list[Path]:
        """The index directories the API fans similar-song queries out to."""
        if not self.index.shards:
            return [self.index_dir]
        out: list[Path] = []
        for pattern in self.index.shards:
            matches = (
                [Path(m) for m in sorted(glob.glob(pattern))] if any(c in pattern for c in "*?[") else [Path(pattern)]
            )
            out.extend(m for m in matches if m not in out)
        return out or [self.index_dir]

    @property
    def archive_dir(self) -> Path:
        return self.retention.archive_dir or self.index_dir / "archive"

    @property
    def head_dir(self) -> Path:
        return self.model.head_dir or self.state_dir / "models" / "current"

    @property
    def engagement_log_dir(self) -> Path:
        return self.feedback.log_dir or self.state_dir / "engagement"

    @property
    def served_log_dir(self) -> Path:
        return self.feedback.served_log_dir or self.state_dir / "served"

    @property
    def served_spool_dir(self) -> Path:
        return self.api.served_spool_dir or self.state_dir / "served-spool"

    @property
    def offline(self) -> bool:
        return self.model.offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with secrets masked (for ``apexrank config show``): secret fields
        as pydantic masks them, and the password of every URL-valued setting, since any of them (the
        Redis URL, a Pushgateway's, an audio host's) may carry credentials."""
        data = self.model_dump(mode="json")
        data["redis"]["url"] = self.redis.url.get_secret_value()  # shown with its password masked below
        return _mask_url_passwords(data)


def _mask_url_passwords(data: Any) -> Any:
    """``data`` (plain JSON data) with the password of every URL in it masked."""
    if isinstance(data, dict):
        return {key: _mask_url_passwords(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_mask_url_passwords(value) for value in data]
    return _mask_url_password(data) if isinstance(data, str) else data


def _mask_url_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL (an unbalanced bracket, a bad port): nothing to mask
        return url
    if password:
        netloc = parts.netloc.replace(f":{password}@", ":**********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
