"""Audio encoders behind one interface: ``mert`` (real weights) and ``logmel`` (no weights, baseline).

Backends are imported lazily by :func:`build_encoder`, so importing this package does not
pull in transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ranker.encoders.base import Encoder, pool_song
from ranker.errors import ConfigError

if TYPE_CHECKING:
    from ranker.settings import Settings

__all__ = ["Encoder", "build_encoder", "pool_song"]


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
    if encoder.sample_rate != settings.audio.sample_rate:
        raise ConfigError(
            f"the {encoder.name} encoder expects {encoder.sample_rate} Hz audio but "
            f"APEXRANK_AUDIO__SAMPLE_RATE={settings.audio.sample_rate}; set it to {encoder.sample_rate}"
        )
    return encoder
