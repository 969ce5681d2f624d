"""The story behind a catalogue, without its audio: labels, appeal, likes, exposure and counts.

Steps 5-7 of the generative story (world version 1; steps 1-3 are in :mod:`ranker.synth.cast`):

5. **Aesthetic labels** (the SongEval scale, 1-5) follow the qualities, with
   ``clean = 1 - noise``: ``label = 1 + 4 * sum(w * quality) + Normal(0, 0.25)``, clipped
   to [1, 5], with the weights in :data:`LABEL_WEIGHTS`:

   - coherence    = 0.50 repetition + 0.35 steadiness + 0.15 consonance
   - musicality   = 0.65 consonance + 0.20 steadiness + 0.15 smoothness
   - memorability = 0.70 repetition + 0.20 consonance + 0.10 clean
   - clarity      = 0.75 clean + 0.25 smoothness
   - naturalness  = 0.60 smoothness + 0.25 clean + 0.15 steadiness
6. **Appeal and likes.** ``appeal = sum(w * (quality - 0.6)) + style taste + Normal(0, 0.45)``
   over the good qualities (clean for noise) with the weights in :data:`APPEAL_WEIGHTS`
   (consonance 1.2, repetition 1.0, clean 1.0, steadiness 0.6, smoothness 0.6); it centres
   near 0 with SD about 0.8. The true probability that one play ends in a like is
   ``sigmoid(-2.5 + 0.8 * appeal)``: about 8 % for a typical song, 2-25 % from the 1st
   to the 99th percentile. It is stored as ``latent_like_prob`` for simulated listeners.
7. **Exposure and counts.** Songs are created over ``span_days`` (28 by default, in time
   order) and counted one day after the span ends. ``log exposure = generator level +
   generator growth x weeks since start + 0.7 log(age in weeks) + Normal(0, 1.3)``.
   Streams are Poisson-Gamma (negative binomial, shape 2) with mean
   ``exp(log exposure + 1.3 appeal)``; likes are ``Binomial(streams, like probability)``,
   so likes never exceed streams. Exposure luck makes the tail heavy: the top 1 % of songs
   hold about 30 % of all streams, the top 10 % about 70 %.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

from ranker.synth.cast import (
    AESTHETIC_NAMES,
    DEFAULT_GENERATORS,
    QUALITY_NAMES,
    FloatArray,
    GeneratorSpec,
    IntArray,
    SongSpec,
    _check_generators,
    _style,
    sample_song_spec,
)

# Weights over "good" qualities: noise enters as clean = 1 - noise.
LABEL_WEIGHTS: dict[str, dict[str, float]] = {
    "coherence": {"repetition": 0.50, "steadiness": 0.35, "consonance": 0.15},
    "musicality": {"consonance": 0.65, "steadiness": 0.20, "smoothness": 0.15},
    "memorability": {"repetition": 0.70, "consonance": 0.20, "clean": 0.10},
    "clarity": {"clean": 0.75, "smoothness": 0.25},
    "naturalness": {"smoothness": 0.60, "clean": 0.25, "steadiness": 0.15},
}
LABEL_NOISE_SD = 0.25
APPEAL_WEIGHTS: dict[str, float] = {
    "consonance": 1.2,
    "steadiness": 0.6,
    "repetition": 1.0,
    "clean": 1.0,
    "smoothness": 0.6,
}
APPEAL_NOISE_SD = 0.45
#: Qualities are measured from a typical song (about the prior mean), so appeal centres near 0.
APPEAL_CENTER = 0.6
LIKE_INTERCEPT = -2.5
LIKE_SLOPE = 0.8
STREAMS_APPEAL_SLOPE = 1.3
EXPOSURE_NOISE_SD = 1.3
EXPOSURE_AGE_SLOPE = 0.7
STREAMS_GAMMA_SHAPE = 2.0
DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)


def _goodness(qualities: FloatArray) -> dict[str, FloatArray]:
    q = np.atleast_2d(np.asarray(qualities, dtype=np.float64))
    if q.shape[1] != len(QUALITY_NAMES):
        raise ValueError(f"qualities must have {len(QUALITY_NAMES)} columns")
    cols = {name: q[:, i] for i, name in enumerate(QUALITY_NAMES)}
    cols["clean"] = 1.0 - cols["noise"]
    return cols


def aesthetic_labels(
    qualities: npt.ArrayLike, rng: np.random.Generator, *, noise_sd: float = LABEL_NOISE_SD
) -> dict[str, FloatArray]:
    """The five SongEval-style labels (1-5) of songs with these qualities ((n, 5) array)."""
    good = _goodness(np.asarray(qualities, dtype=np.float64))
    n = next(iter(good.values())).size
    out: dict[str, FloatArray] = {}
    for label in AESTHETIC_NAMES:
        score = sum((w * good[src] for src, w in LABEL_WEIGHTS[label].items()), start=np.zeros(n))
        out[label] = np.clip(1.0 + 4.0 * score + rng.normal(0.0, noise_sd, size=n), 1.0, 5.0)
    return out


def appeal_scores(
    qualities: npt.ArrayLike,
    styles: Sequence[str],
    rng: np.random.Generator,
    *,
    noise_sd: float = APPEAL_NOISE_SD,
    weights: Mapping[str, float] | None = None,
) -> FloatArray:
    """The audience's latent appeal (log-odds scale) of songs: qualities, style taste and luck.

    ``weights`` overrides some of :data:`APPEAL_WEIGHTS`, for an audience with other tastes.
    """
    good = _goodness(np.asarray(qualities, dtype=np.float64))
    n = next(iter(good.values())).size
    if len(styles) != n:
        raise ValueError("one style per song is needed")
    chosen = {**APPEAL_WEIGHTS, **(weights or {})}
    unknown = set(chosen) - set(APPEAL_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown appeal weights {sorted(unknown)}; known: {sorted(APPEAL_WEIGHTS)}")
    score = sum((w * (good[src] - APPEAL_CENTER) for src, w in chosen.items()), start=np.zeros(n))
    taste = np.array([_style(s).taste for s in styles], dtype=np.float64)
    return np.asarray(score + taste + rng.normal(0.0, noise_sd, size=n), dtype=np.float64)


def like_probability(appeal: npt.ArrayLike) -> FloatArray:
    """The true probability that one play of a song with this appeal ends in a like."""
    a = np.asarray(appeal, dtype=np.float64)
    return np.asarray(1.0 / (1.0 + np.exp(-(LIKE_INTERCEPT + LIKE_SLOPE * a))), dtype=np.float64)


def draw_engagement(
    appeal: npt.ArrayLike, log_exposure: npt.ArrayLike, rng: np.random.Generator
) -> tuple[IntArray, IntArray]:
    """Streams (negative binomial around exposure x appeal) and likes (binomial of streams)."""
    a = np.asarray(appeal, dtype=np.float64)
    mean = np.exp(np.asarray(log_exposure, dtype=np.float64) + STREAMS_APPEAL_SLOPE * a)
    lam = mean * rng.gamma(STREAMS_GAMMA_SHAPE, 1.0 / STREAMS_GAMMA_SHAPE, size=a.shape)
    streams = rng.poisson(lam).astype(np.int64)
    likes = rng.binomial(streams, like_probability(a)).astype(np.int64)
    return streams, likes


@dataclass(frozen=True)
class World:
    """Every song's spec, labels and counts, without audio (arrays indexed by song)."""

    seed: int
    song_ids: list[str]
    specs: list[SongSpec]
    created_at: list[datetime]
    observed_at: datetime
    qualities: FloatArray  # (n, 5), QUALITY_NAMES order
    labels: dict[str, FloatArray]
    appeal: FloatArray
    like_prob: FloatArray
    log_exposure: FloatArray
    streams: IntArray
    likes: IntArray


def sample_world(
    *,
    n_songs: int,
    seed: int,
    generators: Sequence[GeneratorSpec] = DEFAULT_GENERATORS,
    start: datetime | None = None,
    span_days: float = 28.0,
) -> World:
    """Draw the whole catalogue's hidden story without rendering audio (cheap)."""
    if n_songs < 1:
        raise ValueError("n_songs must be at least 1")
    if not span_days > 0:
        raise ValueError("span_days must be positive")
    gens = _check_generators(generators)
    t0 = _check_start(start)
    specs = [
        sample_song_spec(np.random.default_rng(np.random.SeedSequence([seed, 0, i])), generators=gens)
        for i in range(n_songs)
    ]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    # Creation times: stratified over the span, so song order is time order.
    offsets_days = span_days * (np.arange(n_songs) + rng.random(n_songs)) / n_songs
    created = [t0 + timedelta(microseconds=round(d * 86_400e6)) for d in offsets_days]
    observed_at = t0 + timedelta(days=span_days + 1.0)
    age_weeks = (span_days + 1.0 - offsets_days) / 7.0
    qualities = np.stack([s.qualities.as_array() for s in specs])
    styles = [s.style for s in specs]
    labels = aesthetic_labels(qualities, rng)
    appeal = appeal_scores(qualities, styles, rng)
    by_name = {g.name: g for g in gens}
    level = np.array([by_name[s.generator].log_exposure for s in specs])
    growth = np.array([by_name[s.generator].growth_per_week for s in specs])
    log_exposure = (
        level
        + growth * offsets_days / 7.0
        + EXPOSURE_AGE_SLOPE * np.log(age_weeks)
        + rng.normal(0.0, EXPOSURE_NOISE_SD, size=n_songs)
    )
    streams, likes = draw_engagement(appeal, log_exposure, rng)
    return World(
        seed=seed,
        song_ids=[f"syn-{seed}-{i:06d}" for i in range(n_songs)],
        specs=specs,
        created_at=created,
        observed_at=observed_at,
        qualities=qualities,
        labels=labels,
        appeal=appeal,
        like_prob=like_probability(appeal),
        log_exposure=log_exposure,
        streams=streams,
        likes=likes,
    )


def _check_start(start: datetime | None) -> datetime:
    if start is None:
        return DEFAULT_START
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")
    return start.astimezone(UTC)
