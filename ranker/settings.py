"""Every setting apexrank reads, with its default, in one place.

Values come from (highest priority first): explicit arguments, environment
variables prefixed ``APEXRANK_`` (nested fields joined with ``__``, e.g.
``APEXRANK_KAFKA__BOOTSTRAP_SERVERS``), an optional TOML file named by
``APEXRANK_CONFIG`` (or ``--config`` on the command line), then the defaults
below. The defaults point at the embedded stack that ``apexrank services up``
starts, so a fresh checkout works with no configuration at all.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

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
    partitions: int = Field(3, ge=1, description="Partitions used when apexrank creates a topic itself.")
    replication_factor: int = Field(1, ge=1)


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

    url: SecretStr = SecretStr(f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0")
    key_prefix: str = "apexrank"
    socket_timeout_s: float = Field(5.0, gt=0)


class IndexSettings(_Section):
    """FAISS index of song embeddings and the durable embedding store behind it."""

    path: Path | None = Field(None, description="Index directory; default STATE_DIR/index.")
    factory: str = Field("Flat", description="faiss.index_factory string; wrapped in an ID map when needed.")
    use_gpu: Literal["auto", "never", "always"] = "auto"
    snapshot_every_songs: int = Field(1000, ge=1)
    snapshot_every_s: float = Field(60.0, gt=0)


class AudioSettings(_Section):
    """Fetching and decoding newly generated audio."""

    sample_rate: int = 24_000
    segment_s: float = Field(30.0, gt=0)
    min_duration_s: float = Field(1.0, ge=0)
    max_duration_s: float = Field(
        600.0, gt=0, description="Longer songs are scored on their first part only."
    )
    max_bytes: int = Field(100 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(15.0, gt=0)
    silence_rms: float = Field(1e-4, ge=0, description="Mean RMS below this (about -80 dBFS) is silence.")
    file_root: Path | None = Field(None, description="If set, file:// URIs must resolve inside it.")
    allowed_schemes: list[str] = ["file", "http", "https"]


class ModelSettings(_Section):
    """The MERT encoder weights and the APEX head."""

    mert_model: str = Field("m-a-p/MERT-v1-95M", description="Hub id or local directory of MERT weights.")
    offline: bool = Field(False, description="Never contact the Hub (HF_HUB_OFFLINE=1 also sets this).")
    layers: list[int] = [2, 5, 8, 12]
    head_dir: Path | None = Field(None, description="APEX head directory; default STATE_DIR/models/current.")
    seed: int = 42
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logmel_n_mels: int = Field(96, ge=8)


class WorkerSettings(_Section):
    """The scoring worker's batching and retry behaviour."""

    max_poll_records: int = Field(64, ge=1)
    poll_timeout_ms: int = Field(500, ge=10)
    encoder_batch_segments: int = Field(8, ge=1)
    fetch_threads: int = Field(4, ge=1)
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(15.0, gt=0)


class FeedbackSettings(_Section):
    """The engagement (feedback) consumer."""

    max_poll_records: int = Field(2000, ge=1)
    poll_timeout_ms: int = Field(500, ge=10)
    dedup_window_s: int = Field(7 * 24 * 3600, ge=60, description="How long an event_id is remembered.")
    log_dir: Path | None = Field(
        None,
        description="Engagement log (Parquet, by day); default STATE_DIR/engagement. Shared by the group.",
    )


class FeedSettings(_Section):
    """The cold-start prior blend: weights over the seven APEX scores (each rescaled to 0-1)."""

    name: str = "cold-start"
    weights: dict[str, float] = {
        "streams": 0.35,
        "likes": 0.35,
        "coherence": 0.06,
        "musicality": 0.06,
        "memorability": 0.06,
        "clarity": 0.06,
        "naturalness": 0.06,
    }


class Settings(BaseSettings):
    """apexrank's effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix="APEXRANK_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    state_dir: Path = Field(Path(".apexrank"), description="Pid files, logs, index and models.")
    encoder: Literal["mert", "logmel"] = Field("mert", description="logmel needs no weights (baseline/demo).")
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    index: IndexSettings = IndexSettings()
    audio: AudioSettings = AudioSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    feed: FeedSettings = FeedSettings()

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
    def head_dir(self) -> Path:
        return self.model.head_dir or self.state_dir / "models" / "current"

    @property
    def engagement_log_dir(self) -> Path:
        return self.feedback.log_dir or self.state_dir / "engagement"

    @property
    def offline(self) -> bool:
        return self.model.offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with secrets masked (for ``apexrank config show``)."""
        data = self.model_dump(mode="json")
        url = self.redis.url.get_secret_value()
        data["redis"]["url"] = _mask_url_password(url)
        return data


def _mask_url_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":**********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
