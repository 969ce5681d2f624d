"""Audio encoders behind one interface: ``mert`` (real weights) and ``logmel`` (no weights, baseline).

Backends are imported lazily by :func:`build_encoder`, so importing this package does not
pull in transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ranker.encoders.base import Encoder, EncoderSpec, pool_song
from ranker.errors import ConfigError

if TYPE_CHECKING:
    from ranker.settings import Settings

__all__ = ["Encoder", "EncoderSpec", "build_encoder", "encoder_spec", "pool_song"]


def build_encoder(settings: Settings) -> Encoder:
    """The encoder ``settings.encoder`` names; never falls back to another one.

    A MERT model that cannot be loaded raises :class:`ConfigError` naming the settings
    to change, so a deployment never silently scores with the baseline.
    """
    batch_size = settings.worker.encoder_batch_segments
    encoder: Encoder
    if settings.encoder == "mert":
        from ranker.encoders.mert import MertEncoder

        encoder = MertEncoder(settings.model, offline=settings.offline, batch_size=batch_size)
    elif settings.encoder == "logmel":
        from ranker.encoders.logmel import LogMelEncoder

        encoder = LogMelEncoder(settings.model, batch_size=batch_size)
    else:  # pragma: no cover - Settings validates the literal
        raise ConfigError(f"APEXRANK_ENCODER={settings.encoder!r}: expected mert or logmel")
    _check_sample_rate(encoder.name, encoder.sample_rate, settings)
    return encoder


def encoder_spec(settings: Settings) -> EncoderSpec:
    """The spec of the encoder ``settings`` names, equal to ``build_encoder(settings).spec``.

    Loads no weights (MERT: its ``config.json`` only), so that jobs which score stored
    embeddings learn the encoder id and feature shape without a model in memory. Refuses
    what :func:`build_encoder` refuses, with the same errors.
    """
    spec: EncoderSpec
    if settings.encoder == "mert":
        from ranker.encoders.mert_checkpoint import mert_encoder_spec

        spec = mert_encoder_spec(settings.model, offline=settings.offline)
    elif settings.encoder == "logmel":
        from ranker.encoders.logmel import logmel_spec

        spec = logmel_spec(settings.model.logmel_n_mels)
    else:  # pragma: no cover - Settings validates the literal
        raise ConfigError(f"APEXRANK_ENCODER={settings.encoder!r}: expected mert or logmel")
    _check_sample_rate(spec.name, spec.sample_rate, settings)
    return spec


def _check_sample_rate(name: str, rate: int, settings: Settings) -> None:
    if rate != settings.audio.sample_rate:
        raise ConfigError(
            f"the {name} encoder expects {rate} Hz audio but "
            f"APEXRANK_AUDIO__SAMPLE_RATE={settings.audio.sample_rate}; set it to {rate}"
        )
