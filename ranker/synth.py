"""A synthetic music world: short songs with hidden, audible qualities and the counts they earn.

Why it exists: the demo, the tests and the feedback-loop simulation need songs whose
"true" quality is known, so that a ranker can be checked against ground truth. Real
catalogues never give that. Everything here is SYNTHETIC and marked so at every level:
song ids start with ``syn-``, every generator name starts with ``synthetic`` (a
:class:`GeneratorSpec` refuses any other), the catalogue has a boolean column
``synthetic`` (always True), the Parquet schema carries ``apexrank.synthetic = true``
(:func:`read_catalog` refuses tables without it), the sidecar ``catalog.json`` says so,
and every audio file carries the comment ``apexrank synthetic song``. Never mix these
rows into real data, and never report a number measured on them as a result on music.

The generative story (world version 1)
--------------------------------------
1. **Generator.** A song comes from one of a few synthetic generators (default
   ``synthetic-a`` 50 %, ``synthetic-b`` 30 %, ``synthetic-c`` 20 %), picked by share. A
   generator has a *skill* (added to the means of the good qualities, subtracted from
   noise's), an *exposure* level and weekly growth (how many listeners its platform
   reaches), and an audio bandwidth (b is low-passed at 10 kHz, c at 6.5 kHz: an
   audible fingerprint, as real generators have).
2. **Style.** One of five styles, picked by share: ambient 15 %, pop 30 %, electronic
   20 %, folk 15 %, lofi 20 % (:data:`STYLES`). A style sets the tempo range, the
   instruments (bright or dull wavetable timbres), note grid and density, chord rhythm,
   bass, drum pattern, swing, reverb, how often the key is minor, the mean of each hidden
   quality, and a *taste* offset in the audience's appeal. Styles give the embedding
   space its cluster structure.
3. **Hidden qualities**, floats in [0, 1], each drawn from a Beta distribution (mean from
   the style, shifted by the generator's skill, concentration 3). What each one does to
   the song:

   - ``consonance`` c: each melody note leaves the key with probability 0.6(1-c); each
     chord gains a clashing tone (minor second, tritone or major seventh) or becomes a
     random cluster with probability 0.7(1-c); melody and chords are detuned against
     each other by up to 35 cents x (1-c) and each note scatters by 10 cents x (1-c);
   - ``steadiness`` s: onset jitter with SD 50 ms x (1-s), a slow tempo wobble of up to
     120 ms x (1-s), each drum hit dropped with probability 0.3(1-s), and up to
     1.5(1-s)^2 stray drum hits a bar;
   - ``repetition`` r: the song is cut into motif-long segments (2 or 4 beats); each one
     replays the motif with probability r (each of its notes mutated with probability
     0.2(1-r)), otherwise it is a fresh phrase; the chord progression keeps cycling and
     the drum bar stays unvaried with probability r;
   - ``noise`` n (HIGH IS BAD): tanh saturation with drive 1 + 10n^2, hiss at
     0.6 n^1.5 of the music's RMS, 50 or 60 Hz mains hum (four harmonics) at 0.3 n^2,
     and crackle: 25 candidate clicks a second, each heard with probability n^2;
   - ``smoothness`` m: attack times x (0.03 + 0.97m) (clicks when low), releases
     x (0.05 + 0.95m), vibrato x m, harmonic amplitudes jittered by exp(0.9(1-m) z),
     buzzy upper partials, and sample-and-hold aliasing over 1 + round(5(1-m)^2) samples.

   Each quality changes the waveform, not just the bookkeeping. ``tests/test_synth.py``
   checks with plain numpy measures that noise shows in log-mel band statistics,
   consonance in the energy outside the key, steadiness in how onsets lock to the beat
   grid, and repetition in spectral self-similarity one motif apart; the same cues are
   there for MERT.
4. **Audio** (:func:`synthesize_song` = :func:`compose_song` + :func:`render_composition`):
   a score (tempo, key, mode, motif, chords, bass, drums) drawn from the song's own seed,
   rendered by wavetable additive synthesis with envelopes, synthetic drums (pitch-swept
   kick, noise snare, hi-hat or shaker), the style's noise-burst reverb, the damage
   above, the generator's low-pass, then peak normalisation to 0.89. Mono float32, 24 kHz
   by default. Every random draw is made whatever the qualities are, so one seed with
   different qualities gives a *counterfactual twin*: the same song, differently damaged.
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

Determinism: song ``i`` of seed ``s`` draws its spec from ``SeedSequence([s, 0, i])`` and
its audio from the spec's own seed, so the same seed gives identical tables and
identical audio bytes, whatever the number of worker processes. Creation times, labels,
appeal and counts come from ``SeedSequence([s, 1])``.

Using it: :func:`simulate_catalog` writes a whole catalogue; :func:`sample_world` draws the
same story without audio; a loop simulation gets each new song from
:func:`sample_song_spec` and :func:`synthesize_song`, and its truth from
:func:`aesthetic_labels`, :func:`appeal_scores` and :func:`like_probability` on a one-row
quality array.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

__all__ = [
    "AESTHETIC_NAMES",
    "APPEAL_WEIGHTS",
    "DEFAULT_GENERATORS",
    "LABEL_WEIGHTS",
    "QUALITY_NAMES",
    "STYLES",
    "WORLD_VERSION",
    "CatalogResult",
    "Composition",
    "GeneratorSpec",
    "Part",
    "Qualities",
    "SongSpec",
    "Style",
    "World",
    "aesthetic_labels",
    "appeal_scores",
    "compose_song",
    "draw_engagement",
    "like_probability",
    "read_catalog",
    "render_composition",
    "sample_song_spec",
    "sample_world",
    "simulate_catalog",
    "synthesize_song",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Bumped whenever the same seed would produce different songs or counts.
WORLD_VERSION = 1
#: The hidden qualities, in the column order of every quality array.
QUALITY_NAMES: tuple[str, ...] = ("consonance", "steadiness", "repetition", "noise", "smoothness")
#: The five SongEval aesthetics (same order as ``ranker.events.AESTHETIC_TASKS``).
AESTHETIC_NAMES: tuple[str, ...] = ("coherence", "musicality", "memorability", "clarity", "naturalness")
#: Marker written into audio files, Parquet metadata and the sidecar.
SYNTHETIC_MARK = "apexrank synthetic song; not real data"

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
QUALITY_CONCENTRATION = 3.0
DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)


# --------------------------------------------------------------------------- the world's cast


@dataclass(frozen=True)
class GeneratorSpec:
    """A synthetic song generator: its market share, skill, reach and audio bandwidth."""

    name: str
    share: float
    skill: float = 0.0  # added to good qualities' means, subtracted from noise's
    log_exposure: float = 5.0  # log of the typical listeners a week-old song reaches
    growth_per_week: float = 0.0  # platform growth: newer songs reach more listeners
    lowpass_hz: float | None = None  # band limit of the generator's audio, None = full band

    def __post_init__(self) -> None:
        if not self.name.startswith("synthetic"):
            raise ValueError(f"synthetic generator names must start with 'synthetic': {self.name!r}")
        if not self.share > 0:
            raise ValueError(f"generator share must be positive: {self.name}")
        if self.lowpass_hz is not None and not self.lowpass_hz > 0:
            raise ValueError(f"lowpass_hz must be positive or None: {self.name}")


DEFAULT_GENERATORS: tuple[GeneratorSpec, ...] = (
    GeneratorSpec("synthetic-a", share=0.5, skill=0.0, log_exposure=5.8, growth_per_week=0.05),
    GeneratorSpec("synthetic-b", share=0.3, skill=0.08, log_exposure=5.0, growth_per_week=0.15, lowpass_hz=10_000.0),
    GeneratorSpec("synthetic-c", share=0.2, skill=-0.08, log_exposure=4.2, growth_per_week=-0.05, lowpass_hz=6_500.0),
)

DrumHits = tuple[tuple[int, float], ...]  # (sixteenth step within the bar, velocity)


@dataclass(frozen=True)
class Style:
    """A musical style: it sets the sound and the prior of the hidden qualities."""

    name: str
    share: float
    tempo_range: tuple[float, float]
    lead: tuple[str, ...]  # melody instrument choices
    chords: tuple[str, ...]  # chord instrument choices
    step_beats: float  # melody grid step in beats
    density: float  # probability that a melody step starts a note
    chord_hits_per_beat: float  # 0: hold through the segment
    bass: bool
    drums: Mapping[str, DrumHits]  # drum sound -> hits in a 16-step bar
    brightness: float  # 0 dull .. 1 bright timbres
    reverb_s: float
    reverb_mix: float
    minor_prob: float
    swing: float  # 0 straight .. 1 full triplet swing of off-beat eighths
    melody_c: int  # MIDI C the melody's tonic sits above (its motif centres an octave higher)
    quality_means: tuple[float, float, float, float, float]  # in QUALITY_NAMES order
    taste: float  # the audience's preference, added to appeal


_EIGHTHS = tuple((s, 0.5 if s % 4 else 0.7) for s in range(0, 16, 2))
STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "ambient",
            share=0.15,
            tempo_range=(60.0, 80.0),
            lead=("pad", "flute", "keys"),
            chords=("pad",),
            step_beats=1.0,
            density=0.65,
            chord_hits_per_beat=0.0,
            bass=False,
            drums={"kick": ((0, 0.4),)},
            brightness=0.2,
            reverb_s=2.2,
            reverb_mix=0.35,
            minor_prob=0.5,
            swing=0.0,
            melody_c=60,
            quality_means=(0.62, 0.5, 0.5, 0.25, 0.68),
            taste=-0.25,
        ),
        Style(
            "pop",
            share=0.3,
            tempo_range=(96.0, 124.0),
            lead=("lead", "pluck", "keys"),
            chords=("keys", "pluck"),
            step_beats=0.5,
            density=0.75,
            chord_hits_per_beat=1.0,
            bass=True,
            drums={"kick": ((0, 1.0), (8, 0.9), (10, 0.6)), "snare": ((4, 0.9), (12, 0.9)), "hat": _EIGHTHS},
            brightness=0.65,
            reverb_s=0.9,
            reverb_mix=0.15,
            minor_prob=0.3,
            swing=0.0,
            melody_c=48,
            quality_means=(0.6, 0.6, 0.6, 0.3, 0.55),
            taste=0.3,
        ),
        Style(
            "electronic",
            share=0.2,
            tempo_range=(120.0, 136.0),
            lead=("lead", "organ"),
            chords=("pad", "organ"),
            step_beats=0.25,
            density=0.5,
            chord_hits_per_beat=2.0,
            bass=True,
            drums={
                "kick": ((0, 1.0), (4, 1.0), (8, 1.0), (12, 1.0)),
                "snare": ((4, 0.6), (12, 0.6)),
                "hat": tuple((s, 0.8 if s % 4 == 2 else 0.3) for s in range(16)),
            },
            brightness=0.85,
            reverb_s=0.6,
            reverb_mix=0.12,
            minor_prob=0.6,
            swing=0.0,
            melody_c=48,
            quality_means=(0.55, 0.7, 0.65, 0.35, 0.45),
            taste=0.1,
        ),
        Style(
            "folk",
            share=0.15,
            tempo_range=(78.0, 108.0),
            lead=("pluck", "flute"),
            chords=("pluck",),
            step_beats=0.5,
            density=0.7,
            chord_hits_per_beat=2.0,
            bass=False,
            drums={"shaker": tuple((s, 0.6 if s % 4 == 0 else 0.35) for s in range(0, 16, 2))},
            brightness=0.45,
            reverb_s=1.0,
            reverb_mix=0.18,
            minor_prob=0.4,
            swing=0.15,
            melody_c=48,
            quality_means=(0.62, 0.45, 0.55, 0.3, 0.7),
            taste=0.0,
        ),
        Style(
            "lofi",
            share=0.2,
            tempo_range=(68.0, 90.0),
            lead=("keys", "pluck"),
            chords=("keys",),
            step_beats=0.5,
            density=0.6,
            chord_hits_per_beat=0.5,
            bass=True,
            drums={"kick": ((0, 1.0), (7, 0.6), (10, 0.8)), "snare": ((4, 0.8), (12, 0.8)), "hat": _EIGHTHS},
            brightness=0.25,
            reverb_s=0.8,
            reverb_mix=0.2,
            minor_prob=0.6,
            swing=0.6,
            melody_c=48,
            quality_means=(0.55, 0.5, 0.55, 0.55, 0.5),
            taste=-0.1,
        ),
    )
}


@dataclass(frozen=True)
class Qualities:
    """The five hidden qualities of a song, each in [0, 1] (``noise``: high is bad)."""

    consonance: float
    steadiness: float
    repetition: float
    noise: float
    smoothness: float

    def __post_init__(self) -> None:
        for name in QUALITY_NAMES:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"quality {name} must be in [0, 1], got {value!r}")

    def as_array(self) -> FloatArray:
        return np.array([getattr(self, n) for n in QUALITY_NAMES], dtype=np.float64)

    @classmethod
    def coerce(cls, value: Qualities | Mapping[str, float] | Sequence[float] | npt.ArrayLike) -> Qualities:
        """Accept a Qualities, a name->value mapping, or five values in QUALITY_NAMES order."""
        if isinstance(value, Qualities):
            return value
        if isinstance(value, Mapping):
            missing = set(QUALITY_NAMES) - set(value)
            if missing:
                raise ValueError(f"missing qualities: {sorted(missing)}")
            return cls(**{n: float(value[n]) for n in QUALITY_NAMES})
        arr = np.asarray(value, dtype=np.float64).ravel()
        if arr.shape != (len(QUALITY_NAMES),):
            raise ValueError(f"expected {len(QUALITY_NAMES)} qualities, got shape {arr.shape}")
        return cls(*(float(v) for v in arr))


@dataclass(frozen=True)
class SongSpec:
    """What the world decides about a song before it is rendered."""

    style: str
    generator: str
    qualities: Qualities
    audio_seed: int


def _pick_generator(generators: Sequence[GeneratorSpec], name: str | GeneratorSpec | None) -> GeneratorSpec:
    if isinstance(name, GeneratorSpec):
        return name
    for g in generators:
        if g.name == name:
            return g
    raise ValueError(f"unknown generator {name!r}; known: {[g.name for g in generators]}")


def _check_generators(generators: Sequence[GeneratorSpec]) -> tuple[GeneratorSpec, ...]:
    gens = tuple(generators)
    if not gens:
        raise ValueError("at least one generator is needed")
    names = [g.name for g in gens]
    if len(set(names)) != len(names):
        raise ValueError(f"generator names must be unique: {names}")
    return gens


def sample_song_spec(
    rng: np.random.Generator,
    *,
    generators: Sequence[GeneratorSpec] = DEFAULT_GENERATORS,
    generator: str | GeneratorSpec | None = None,
    style: str | None = None,
) -> SongSpec:
    """Draw a new song's generator, style, hidden qualities and audio seed.

    Used for the catalogue and for songs that keep arriving in a loop simulation; pass
    ``generator`` or ``style`` to pin them.
    """
    gens = _check_generators(generators)
    shares = np.array([g.share for g in gens])
    gen_choice = int(rng.choice(len(gens), p=shares / shares.sum()))
    gen = gens[gen_choice] if generator is None else _pick_generator(gens, generator)
    names = list(STYLES)
    style_shares = np.array([STYLES[n].share for n in names])
    style_choice = names[int(rng.choice(len(names), p=style_shares / style_shares.sum()))]
    st = STYLES[style_choice if style is None else _style(style).name]
    sign = np.array([1.0, 1.0, 1.0, -1.0, 1.0])
    means = np.clip(np.asarray(st.quality_means) + sign * gen.skill, 0.08, 0.92)
    q = rng.beta(means * QUALITY_CONCENTRATION, (1.0 - means) * QUALITY_CONCENTRATION)
    return SongSpec(
        style=st.name,
        generator=gen.name,
        qualities=Qualities.coerce(np.clip(q, 0.0, 1.0)),
        audio_seed=int(rng.integers(0, 2**63 - 1)),
    )


def _style(name: str) -> Style:
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"unknown style {name!r}; known: {list(STYLES)}") from None


# --------------------------------------------------------------------------- composition

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
_PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 4), (5, 3, 0, 4), (0, 3, 0, 4))


@dataclass(frozen=True)
class Part:
    """Notes of one instrument: onset and held duration in seconds, pitch as float MIDI."""

    instrument: str
    onsets: FloatArray
    durations: FloatArray
    pitches: FloatArray
    velocities: FloatArray
    gain: float


@dataclass(frozen=True)
class Composition:
    """A song's score: everything about it except the sample rate."""

    style: str
    qualities: Qualities
    duration_s: float
    tempo_bpm: float
    key: int  # tonic pitch class, 0 = C
    mode: Literal["major", "minor"]
    parts: tuple[Part, ...]
    drums: Mapping[str, tuple[FloatArray, FloatArray]]  # sound -> (onsets, velocities)
    seed: int  # drives the rendering's own randomness (timbre jitter, noise, reverb)


def _degrees_to_midi(degrees: npt.NDArray[np.int64], scale: npt.NDArray[np.int64], tonic: int) -> FloatArray:
    octave, idx = np.divmod(degrees, 7)
    return (tonic + 12 * octave + scale[idx]).astype(np.float64)


def _out_of_key(
    midi: FloatArray, u: FloatArray, up: npt.NDArray[np.bool_], scale_pcs: set[int], prob: float
) -> FloatArray:
    """Move the notes whose draw ``u`` is below ``prob`` to the nearest out-of-key semitone."""
    out = midi.copy()
    for i in np.flatnonzero(u < prob):
        step = 1 if up[i] else -1
        note = int(out[i]) + step
        if note % 12 in scale_pcs:
            note += step
        if note % 12 in scale_pcs:
            note -= 3 * step
        out[i] = float(note)
    return out


_MOVES = np.array([-2, -1, -1, 0, 1, 1, 2, 3, -3, 4])


@dataclass(frozen=True)
class _PhraseDraws:
    """Random draws for one phrase slot grid, made whether or not the phrase is used."""

    onset_u: FloatArray
    moves: npt.NDArray[np.int64]
    out_u: FloatArray
    up: npt.NDArray[np.bool_]
    start_degree: int

    @classmethod
    def draw(cls, rng: np.random.Generator, n_slots: int, start_degree: int) -> _PhraseDraws:
        return cls(
            rng.random(n_slots),
            rng.choice(_MOVES, size=n_slots),
            rng.random(n_slots),
            rng.random(n_slots) < 0.5,
            start_degree,
        )

    def phrase(
        self, density: float, scale: npt.NDArray[np.int64], tonic_midi: int, scale_pcs: set[int], p_out: float
    ) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """Slot indices that start a note and the notes' pitches (a stepwise walk in the scale)."""
        mask = self.onset_u < density
        mask[0] = True
        slots = np.flatnonzero(mask).astype(np.int64)
        moves = self.moves[slots]
        degrees = np.clip(self.start_degree + np.cumsum(moves) - moves[0], -3, 11).astype(np.int64)
        midi = _degrees_to_midi(degrees, scale, tonic_midi)
        return slots, _out_of_key(midi, self.out_u[slots], self.up[slots], scale_pcs, p_out)


def _sub_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def compose_song(
    rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
    qualities: Qualities | Mapping[str, float] | Sequence[float] | npt.ArrayLike,
    style: str,
    duration_s: float = 6.0,
) -> Composition:
    """Write the score of a song whose qualities are given: most audible choices happen here.

    Every random draw is made whatever the qualities are (separate streams for the
    song's plan, melody, chords, drums, timing and tuning), so one seed with different
    qualities is the same song with different damage: a counterfactual twin.
    """
    q = Qualities.coerce(qualities)
    st = _style(style)
    if not duration_s > 0:
        raise ValueError("duration_s must be positive")
    g_plan, g_mel, g_chord, g_drum, g_time, g_tune, g_render = _sub_rngs(_as_rng(rng_or_seed), 7)
    cons, steady, rep = q.consonance, q.steadiness, q.repetition

    # The plan: tempo, key, grid and instruments.
    tempo = float(g_plan.uniform(*st.tempo_range))
    beat = 60.0 / tempo
    n_beats = math.ceil(duration_s / beat) + 1
    motif_beats = 4 if duration_s / beat >= 12 else 2
    n_segments = math.ceil(n_beats / motif_beats)
    n_slots = max(1, round(motif_beats / st.step_beats))
    tonic = int(g_plan.integers(0, 12))
    mode: Literal["major", "minor"] = "minor" if g_plan.random() < st.minor_prob else "major"
    scale = _MAJOR if mode == "major" else _MINOR
    scale_pcs = {int((tonic + s) % 12) for s in scale}
    mel_tonic = st.melody_c + tonic
    lead = str(g_plan.choice(st.lead))
    chord_inst = str(g_plan.choice(st.chords))
    prog = _PROGRESSIONS[int(g_plan.integers(len(_PROGRESSIONS)))]
    wobble_period = float(g_plan.uniform(2.0, 5.0))
    wobble_phase = float(g_plan.uniform(0, 2 * math.pi))
    p_out = 0.6 * (1.0 - cons)

    # Timing: a beat grid with swing, bent by a slow tempo wobble and per-note jitter.
    wobble_amp = (1.0 - steady) * 0.12
    jitter_sd = (1.0 - steady) * 0.05

    def to_time(beats: FloatArray, z: FloatArray) -> FloatArray:
        frac = np.mod(beats, 1.0)
        t = (beats + np.where(np.abs(frac - 0.5) < 1e-9, st.swing / 6.0, 0.0)) * beat
        t = t + wobble_amp * np.sin(2 * math.pi * t / wobble_period + wobble_phase) + jitter_sd * z
        return np.maximum(t, 0.0)

    # Tuning: each part has its own offset and each note its own scatter, scaled by dissonance.
    detune_scale = 1.0 - cons
    mel_offset, chord_offset = np.clip(0.2 * g_tune.standard_normal(2), -0.35, 0.35)  # semitones

    # Melody: a motif that comes back with probability `repetition`, otherwise fresh phrases.
    motif = _PhraseDraws.draw(g_mel, n_slots, 7 + int(g_mel.integers(-2, 3)))
    motif_slots, motif_midi = motif.phrase(st.density, scale, mel_tonic, scale_pcs, p_out)
    mel_beats: list[FloatArray] = []
    mel_pitch: list[FloatArray] = []
    mel_z: list[FloatArray] = []
    mel_tune: list[FloatArray] = []
    mel_vel: list[FloatArray] = []
    for seg in range(n_segments):
        reuse_u = g_mel.random()
        fresh = _PhraseDraws.draw(g_mel, n_slots, int(g_mel.integers(3, 11)))
        mut_u, mut_deg = g_mel.random(n_slots), g_mel.integers(0, 12, size=n_slots)
        mut_out_u, mut_up = g_mel.random(n_slots), g_mel.random(n_slots) < 0.5
        z_time, z_tune, vel = (
            g_time.standard_normal(n_slots),
            g_tune.standard_normal(n_slots),
            g_mel.random(n_slots),
        )
        if seg == 0 or reuse_u < rep:
            slots, midi = motif_slots, motif_midi.copy()
            mutate = mut_u[slots] < 0.2 * (1.0 - rep)
            if mutate.any():
                fresh_midi = _degrees_to_midi(mut_deg[slots][mutate], scale, mel_tonic)
                midi[mutate] = _out_of_key(
                    fresh_midi, mut_out_u[slots][mutate], mut_up[slots][mutate], scale_pcs, p_out
                )
        else:
            slots, midi = fresh.phrase(st.density, scale, mel_tonic, scale_pcs, p_out)
        mel_beats.append((seg * motif_beats + slots * st.step_beats).astype(np.float64))
        mel_pitch.append(midi)
        mel_z.append(z_time[slots])
        mel_tune.append(z_tune[slots])
        mel_vel.append(0.7 + 0.3 * vel[slots])
    beats_arr = np.concatenate(mel_beats)
    keep = beats_arr * beat < duration_s
    beats_arr = beats_arr[keep]
    gaps = np.diff(np.append(beats_arr, beats_arr[-1] + 2 * st.step_beats))
    mel_midi = np.concatenate(mel_pitch)[keep]
    parts = [
        Part(
            lead,
            to_time(beats_arr, np.concatenate(mel_z)[keep]),
            np.minimum(gaps, 2.0) * beat * 0.9,
            mel_midi + detune_scale * (mel_offset + 0.1 * np.concatenate(mel_tune)[keep]),
            np.concatenate(mel_vel)[keep],
            gain=0.5,
        )
    ]

    # Harmony: a chord per segment, cycling a progression when repetition is high;
    # dissonance adds a clashing tone or swaps the chord for a random cluster.
    cycle_u, rand_root = g_chord.random(n_segments), g_chord.integers(0, 7, size=n_segments)
    clash_u, clash_kind_u = g_chord.random(n_segments), g_chord.random(n_segments)
    clash_pos = g_chord.integers(1, 3, size=n_segments)
    clash_iv = g_chord.choice(np.array([1.0, 6.0, 11.0]), size=n_segments)
    clusters = np.sort(np.argsort(g_chord.random((n_segments, 12)), axis=1)[:, :3], axis=1)
    seg_ids = np.arange(n_segments)
    roots = np.where((seg_ids < 4) | (cycle_u < rep), np.array(prog)[seg_ids % 4], rand_root)
    chord_deg = (roots[:, None] + np.array([0, 2, 4])[None, :]).astype(np.int64)
    chord_midi = _degrees_to_midi(chord_deg, scale, 48 + tonic)
    for s in np.flatnonzero(clash_u < 0.7 * (1.0 - cons)):
        if clash_kind_u[s] < 0.5:
            chord_midi[s, clash_pos[s]] = chord_midi[s, 0] + clash_iv[s]
        else:
            chord_midi[s] = 48 + tonic + clusters[s].astype(np.float64)
    if st.chord_hits_per_beat > 0:
        hit_len = 1.0 / st.chord_hits_per_beat
        hits_per_seg = max(1, round(motif_beats / hit_len))
    else:
        hit_len, hits_per_seg = float(motif_beats), 1
    seg_idx = np.repeat(seg_ids, hits_per_seg)
    ch_beats = (seg_idx * motif_beats + np.tile(np.arange(hits_per_seg) * hit_len, n_segments)).astype(float)
    n_all = ch_beats.size
    z_hit, z_strum = g_time.standard_normal(n_all), g_time.standard_normal(3 * n_all)
    z_note, vel_hit = g_tune.standard_normal(3 * n_all), g_chord.uniform(0.6, 0.9, size=n_all)
    keep = ch_beats * beat < duration_s
    keep3 = np.repeat(keep, 3)
    ch_on = np.repeat(to_time(ch_beats, z_hit), 3) + 0.004 * z_strum
    parts.append(
        Part(
            chord_inst,
            np.maximum(ch_on[keep3], 0.0),
            np.full(int(keep3.sum()), hit_len * beat * 0.95),
            (chord_midi[seg_idx].ravel() + detune_scale * (chord_offset + 0.06 * z_note))[keep3],
            np.repeat(vel_hit, 3)[keep3],
            gain=0.22,
        )
    )
    if st.bass:
        b_beats = np.arange(0, n_segments * motif_beats, 1.0 if tempo < 100 else 2.0)
        z_bass, vel_bass = g_time.standard_normal(b_beats.size), g_chord.uniform(0.8, 1.0, size=b_beats.size)
        keep = b_beats * beat < duration_s
        b_seg = (b_beats[keep] // motif_beats).astype(np.int64)
        b_midi = chord_midi[b_seg, 0] - 12 * (1 + (chord_midi[b_seg, 0] >= 54))
        parts.append(
            Part(
                "bass",
                to_time(b_beats[keep], z_bass[keep]),
                np.full(int(keep.sum()), beat * 0.9),
                b_midi + detune_scale * chord_offset,
                vel_bass[keep],
                gain=0.45,
            )
        )

    # Drums: the style's bar, varied when repetition is low, with dropped and stray hits when unsteady.
    drums: dict[str, tuple[FloatArray, FloatArray]] = {}
    n_bars = math.ceil(n_beats / 4)
    stray_p = 0.375 * (1.0 - steady) ** 2  # per candidate; up to 1.5 stray hits a bar
    for sound, hits in st.drums.items():
        base_steps = np.array([h[0] for h in hits], dtype=np.float64)
        base_vel = np.array([h[1] for h in hits], dtype=np.float64)
        h = base_steps.size
        vary_u, move_u = g_drum.random(n_bars), g_drum.random((n_bars, h))
        move_to, drop_u = g_drum.integers(0, 16, size=(n_bars, h)), g_drum.random((n_bars, h))
        vel_f, z_hits = g_drum.uniform(0.85, 1.0, size=(n_bars, h)), g_time.standard_normal((n_bars, h))
        stray_u, stray_pos = g_drum.random((n_bars, 4)), g_drum.uniform(0, 16, size=(n_bars, 4))
        stray_vel, z_stray = g_drum.uniform(0.3, 0.9, size=(n_bars, 4)), g_time.standard_normal((n_bars, 4))
        bar_ids = np.arange(n_bars)[:, None]
        moved = (bar_ids > 0) & (vary_u[:, None] > rep) & (move_u < 0.4)
        steps_b = np.where(moved, move_to, base_steps[None, :])
        kept = drop_u >= 0.3 * (1.0 - steady)
        strays = stray_u < stray_p
        onsets = np.concatenate([(bar_ids * 4 + steps_b / 4.0)[kept], (bar_ids * 4 + stray_pos / 4.0)[strays]])
        vels = np.concatenate([(base_vel[None, :] * vel_f)[kept], stray_vel[strays]])
        zs = np.concatenate([z_hits[kept], z_stray[strays]])
        in_song = onsets * beat < duration_s
        drums[sound] = (to_time(onsets[in_song], zs[in_song]), vels[in_song])

    return Composition(
        style=st.name,
        qualities=q,
        duration_s=float(duration_s),
        tempo_bpm=tempo,
        key=tonic,
        mode=mode,
        parts=tuple(parts),
        drums=drums,
        seed=int(g_render.integers(0, 2**63 - 1)),
    )


# --------------------------------------------------------------------------- rendering

_TABLE_N = 2048
_TABLE_MASK = _TABLE_N - 1


@dataclass(frozen=True)
class _Instrument:
    slope: float  # harmonic k has amplitude k ** -slope
    n_harmonics: int
    attack_s: float
    decay_s: float
    sustain: float
    release_s: float
    odd_only: bool = False
    dull_slope: float | None = None  # timbre darkens from slope to dull_slope (plucks)
    darken_s: float = 0.2
    vibrato_cents: float = 0.0
    voices: int = 1


_INSTRUMENTS: dict[str, _Instrument] = {
    "pluck": _Instrument(1.0, 16, 0.003, 0.35, 0.0, 0.08, dull_slope=3.2, darken_s=0.12),
    "keys": _Instrument(2.2, 8, 0.005, 0.9, 0.15, 0.15, dull_slope=3.5, darken_s=0.4),
    "lead": _Instrument(1.0, 20, 0.015, 0.6, 0.7, 0.06, vibrato_cents=12.0),
    "pad": _Instrument(1.8, 12, 0.25, 2.0, 0.8, 0.5, vibrato_cents=4.0, voices=2),
    "organ": _Instrument(1.0, 15, 0.01, 1.0, 0.9, 0.05, odd_only=True),
    "flute": _Instrument(3.0, 6, 0.06, 1.0, 0.85, 0.1, vibrato_cents=15.0),
    "bass": _Instrument(2.5, 6, 0.005, 0.5, 0.5, 0.06, dull_slope=4.0, darken_s=0.15),
}


def _wavetable(amps: FloatArray) -> FloatArray:
    """One period of sum(a_k sin(k x)), peak-normalised (the inverse FFT builds it exactly)."""
    spec = np.zeros(_TABLE_N // 2 + 1, dtype=np.complex128)
    spec[1 : amps.size + 1] = -0.5j * amps * _TABLE_N
    table = np.fft.irfft(spec, n=_TABLE_N)
    return np.asarray(table / max(float(np.max(np.abs(table))), 1e-9), dtype=np.float64)


def _harmonics(inst: _Instrument, slope: float, n: int, smooth: float, rng: np.random.Generator) -> FloatArray:
    k = np.arange(1, n + 1, dtype=np.float64)
    amps = k**-slope
    if inst.odd_only:
        amps[1::2] *= 0.08
    harsh = 1.0 - smooth
    z = rng.standard_normal(inst.n_harmonics)[:n]  # same draws whatever n is
    amps = amps * np.exp(0.9 * harsh * z)  # jagged spectrum
    amps = amps + np.where(k >= 5, 0.35 * harsh**1.5 * k**-0.3, 0.0)  # buzzy upper partials
    return np.asarray(amps, dtype=np.float64)


def _render_part(
    out: FloatArray, part: Part, sr: int, brightness: float, smooth: float, rng: np.random.Generator
) -> None:
    """Add one part's notes to ``out`` by wavetable lookup (one table read per sample)."""
    if part.onsets.size == 0:
        return
    inst = _INSTRUMENTS[part.instrument]
    top_hz = 440.0 * 2.0 ** ((float(part.pitches.max()) - 69.0) / 12.0)
    n_harm = int(max(1, min(inst.n_harmonics, 0.45 * sr / top_hz)))
    slope = max(0.4, inst.slope + (0.5 - brightness) * 1.2)
    bright_table = _wavetable(_harmonics(inst, slope, n_harm, smooth, rng))
    dull_table = (
        _wavetable(_harmonics(inst, inst.dull_slope + (0.5 - brightness), n_harm, smooth, rng))
        if inst.dull_slope is not None
        else None
    )
    attack = max(inst.attack_s * (0.03 + 0.97 * smooth), 1.0 / sr)
    release = max(inst.release_s * (0.05 + 0.95 * smooth), 1.0 / sr)
    vib_depth = inst.vibrato_cents * smooth * math.log(2.0) / 1200.0
    n_out = out.size
    max_len = min(int((float(part.durations.max()) + release) * sr) + 1, n_out)
    # Per-part curves, sliced per note: no transcendental function is evaluated per note.
    t_all = np.arange(max_len, dtype=np.float64) / sr
    base_env = np.minimum(1.0, t_all / attack) * (inst.sustain + (1.0 - inst.sustain) * np.exp(-t_all / inst.decay_s))
    darken = np.exp(-t_all / inst.darken_s) if dull_table is not None else None
    vibrato = np.cumsum(1.0 + vib_depth * np.sin(2 * math.pi * 5.0 * t_all)) if vib_depth > 0 else None
    ramp_index = np.arange(max_len, dtype=np.float64)
    detunes = (0.0, 0.07) if inst.voices == 2 else (0.0,)
    phases = rng.integers(0, _TABLE_N, size=(part.onsets.size, len(detunes)))
    for onset, dur, pitch, vel, phase0 in zip(
        part.onsets, part.durations, part.pitches, part.velocities, phases, strict=True
    ):
        start = int(onset * sr)
        if start >= n_out:
            continue
        held = int(dur * sr)
        n = min(int((dur + release) * sr), n_out - start, max_len)
        if n <= 1:
            continue
        env = base_env[:n] * (part.gain * vel / len(detunes))
        if n > held:
            env[held:] *= 1.0 - ramp_index[: n - held] / (n - held)
        y = np.zeros(n)
        for cents, offset in zip(detunes, phase0, strict=True):
            inc = 440.0 * 2.0 ** ((pitch + cents - 69.0) / 12.0) * _TABLE_N / sr
            phase = inc * (vibrato[:n] if vibrato is not None else ramp_index[:n])
            idx = (phase + offset).astype(np.int64) & _TABLE_MASK
            if dull_table is None or darken is None:
                y += bright_table[idx]
            else:
                dull = dull_table[idx]
                y += dull + (bright_table[idx] - dull) * darken[:n]
        out[start : start + n] += env * y


def _drum_sounds(sr: int, rng: np.random.Generator) -> dict[str, FloatArray]:
    def t_of(seconds: float) -> FloatArray:
        return np.arange(int(seconds * sr), dtype=np.float64) / sr

    t = t_of(0.35)
    f_hi, f_lo = rng.uniform(110, 160), rng.uniform(42, 60)
    freq = f_lo + (f_hi - f_lo) * np.exp(-t / 0.03)
    kick = np.sin(2 * math.pi * np.cumsum(freq) / sr) * np.exp(-t / rng.uniform(0.1, 0.22))
    t = t_of(0.25)
    snare_noise = np.diff(rng.standard_normal(t.size + 1)) * 0.5
    snare = (snare_noise * np.exp(-t / 0.06) + 0.6 * np.sin(2 * math.pi * 185.0 * t) * np.exp(-t / 0.04)) * 0.8
    t = t_of(0.08)
    hat = np.diff(rng.standard_normal(t.size + 1)) * np.exp(-t / rng.uniform(0.012, 0.03)) * 0.4
    t = t_of(0.12)
    shaker = np.diff(rng.standard_normal(t.size + 1)) * np.minimum(1.0, t / 0.015) * np.exp(-t / 0.035) * 0.35
    return {"kick": kick, "snare": snare, "hat": hat, "shaker": shaker}


_HUM_TABLE = _wavetable(0.6 ** np.arange(4.0))
_HISS_LEN = 1 << 18


@lru_cache(maxsize=1)
def _hiss_table() -> FloatArray:
    """Hiss at unit RMS (white plus a low-passed share), made once; songs read it at random offsets.

    Reading a shared table instead of drawing fresh noise saves several full-length passes
    per song; with 262,144 possible offsets no two songs share a noise pattern in practice.
    """
    white = np.random.default_rng(0x5EED).standard_normal(_HISS_LEN + 8)
    csum = np.cumsum(white)
    hiss = 0.5 * white[8:] + (csum[8:] - csum[:-8]) / 8.0 * 1.5
    hiss /= np.sqrt(np.mean(hiss**2))
    return np.concatenate([hiss, hiss])  # doubled: any window up to _HISS_LEN is a plain slice


def _hiss(n: int, offset: int) -> FloatArray:
    table = _hiss_table()
    if n <= _HISS_LEN:
        return table[offset : offset + n]
    return np.resize(table[offset : offset + _HISS_LEN], n)


@lru_cache(maxsize=8)
def _hum(mains: int, sr: int, n: int) -> FloatArray:
    """Mains hum (fundamental and three harmonics) one period longer than a song, cached."""
    idx = (np.arange(n + sr // mains + 1, dtype=np.float64) * (mains * _TABLE_N / sr)).astype(np.int64)
    return _HUM_TABLE[idx & _TABLE_MASK]


_DRUM_GAIN = {"kick": 0.9, "snare": 0.5, "hat": 0.25, "shaker": 0.3}


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: pocketfft is several times slower on awkward sizes."""
    best = 1 << max(1, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


@lru_cache(maxsize=64)
def _room_response(style: str, sr: int, nfft: int) -> npt.NDArray[np.complex128]:
    """A style's room: the spectrum of a decaying noise burst, fixed per style (cached)."""
    st = _style(style)
    rng = np.random.default_rng(zlib.crc32(style.encode()))
    ir_len = int(min(st.reverb_s, 1.0) * sr)
    ir = rng.standard_normal(ir_len) * np.exp(-np.arange(ir_len) / (st.reverb_s * sr / 6.9))
    ir *= st.reverb_mix / max(float(np.sqrt(np.sum(ir**2))), 1e-9)
    ir[0] += 1.0
    return np.fft.rfft(ir, nfft)


def _lowpass(y: FloatArray, cutoff_hz: float, sr: int) -> FloatArray:
    """Zero-phase 6th-order Butterworth magnitude applied in the frequency domain."""
    nfft = _fft_size(y.size)
    f = np.fft.rfftfreq(nfft, 1.0 / sr)
    spec = np.fft.rfft(y, nfft) / np.sqrt(1.0 + (f / cutoff_hz) ** 12)
    return np.fft.irfft(spec, nfft)[: y.size]


def render_composition(comp: Composition, sample_rate: int = 24000, *, lowpass_hz: float | None = None) -> FloatArray:
    """Turn a score into a mono waveform (float64) and apply the quality damage.

    The noise and smoothness qualities act here, on the sound rather than on the notes.
    """
    if sample_rate < 8000:
        raise ValueError("sample_rate must be at least 8000 Hz")
    sr = int(sample_rate)
    g_drums, g_noise, *g_parts = _sub_rngs(np.random.default_rng(comp.seed), 2 + len(comp.parts))
    st = _style(comp.style)
    q = comp.qualities
    n = max(1, round(comp.duration_s * sr))
    music = np.zeros(n)
    for part, g_part in zip(comp.parts, g_parts, strict=True):
        _render_part(music, part, sr, st.brightness, q.smoothness, g_part)
    sounds = _drum_sounds(sr, g_drums)
    for sound, (onsets, vels) in comp.drums.items():
        buf = sounds[sound] * _DRUM_GAIN[sound]
        for onset, vel in zip(onsets, vels, strict=True):
            start = int(onset * sr)
            if start < n:
                m = min(buf.size, n - start)
                music[start : start + m] += vel * buf[:m]

    # Room: the style's impulse response (at most 1 s long), by FFT convolution.
    nfft = _fft_size(n + sr)
    y = np.fft.irfft(np.fft.rfft(music, nfft) * _room_response(st.name, sr, nfft), nfft)[:n]

    # Low smoothness: sample-and-hold aliasing, a "digital" artefact.
    hold = 1 + round(5.0 * (1.0 - q.smoothness) ** 2)
    if hold > 1:
        y = np.repeat(y[::hold], hold)[:n]

    # Noise: saturation, then hiss, hum and crackle on the recording chain.
    rms = max(float(np.sqrt(np.mean(y**2))), 1e-9)
    drive = 1.0 + 10.0 * q.noise**2
    y = np.tanh(y * (drive * 0.15 / rms))  # the signal at RMS 0.15 through a tanh drive
    y *= 0.15 / math.tanh(drive * 0.15)
    rms = max(float(np.sqrt(np.mean(y**2))), 1e-9)
    hiss_at = int(g_noise.integers(_HISS_LEN))
    mains = 50 if g_noise.random() < 0.5 else 60
    hum_at = int(g_noise.integers(sr // mains))
    y += (0.6 * q.noise**1.5 * rms) * _hiss(n, hiss_at)
    y += (0.3 * q.noise**2 * rms) * _hum(mains, sr, n)[hum_at : hum_at + n]
    # Crackle: 25 candidate clicks a second, each heard with probability noise^2.
    n_cand = int(g_noise.poisson(25.0 * comp.duration_s))
    pos, heard_u = g_noise.integers(0, n, size=n_cand), g_noise.random(n_cand)
    amp = g_noise.choice([-1.0, 1.0], size=n_cand) * g_noise.uniform(1.0, 4.0, size=n_cand) * rms
    heard = heard_u < q.noise**2
    np.add.at(y, pos[heard], amp[heard])

    if lowpass_hz is not None and lowpass_hz < 0.5 * sr:
        y = _lowpass(y, lowpass_hz, sr)
    fade = min(n // 2, int(0.005 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        y[:fade] *= ramp
        y[n - fade :] *= ramp[::-1]
    peak = float(np.max(np.abs(y)))
    return np.asarray(y * (0.89 / peak) if peak > 0 else y, dtype=np.float64)


def synthesize_song(
    rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
    qualities: Qualities | Mapping[str, float] | Sequence[float] | npt.ArrayLike,
    style: str,
    duration_s: float = 6.0,
    sample_rate: int = 24000,
    *,
    generator: str | GeneratorSpec | None = None,
    generators: Sequence[GeneratorSpec] = DEFAULT_GENERATORS,
) -> npt.NDArray[np.float32]:
    """One song as mono float32 in [-0.89, 0.89]: the entry point for songs that keep arriving.

    ``generator`` (a name among ``generators`` or a spec) adds its bandwidth fingerprint.
    """
    comp = compose_song(rng_or_seed, qualities, style, duration_s)
    lowpass = None if generator is None else _pick_generator(generators, generator).lowpass_hz
    return render_composition(comp, sample_rate, lowpass_hz=lowpass).astype(np.float32)


def _as_rng(value: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
    if isinstance(value, np.random.Generator):
        return value
    return np.random.default_rng(value)


# --------------------------------------------------------------------------- labels and counts


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


# --------------------------------------------------------------------------- the catalogue on disk


@dataclass(frozen=True)
class _RenderJob:
    index: int
    path: str
    audio_seed: int
    qualities: tuple[float, ...]
    style: str
    duration_s: float
    sample_rate: int
    lowpass_hz: float | None
    fmt: str


def _render_job(job: _RenderJob) -> tuple[int, float, int, str, str]:
    """Compose, render and write one song (runs in a worker process)."""
    comp = compose_song(job.audio_seed, job.qualities, job.style, job.duration_s)
    audio = render_composition(comp, job.sample_rate, lowpass_hz=job.lowpass_hz).astype(np.float32)
    with sf.SoundFile(
        job.path, "w", job.sample_rate, 1, subtype="PCM_16", format=job.fmt.upper()
    ) as handle:  # metadata must precede the samples
        handle.comment = SYNTHETIC_MARK
        handle.software = f"apexrank.synth world v{WORLD_VERSION}"
        handle.write(audio)
    return job.index, comp.tempo_bpm, comp.key, comp.mode, comp.parts[0].instrument


def _render_chunk(jobs: list[_RenderJob]) -> list[tuple[int, float, int, str, str]]:
    return [_render_job(j) for j in jobs]


@dataclass(frozen=True)
class CatalogResult:
    """Where a simulated catalogue landed, its table and how long synthesis took."""

    out_dir: Path
    catalog_path: Path
    metadata_path: Path
    audio_dir: Path
    table: Any  # pyarrow.Table
    n_songs: int
    seed: int
    elapsed_s: float

    @property
    def songs_per_s(self) -> float:
        return self.n_songs / self.elapsed_s if self.elapsed_s > 0 else float("inf")


def simulate_catalog(
    out_dir: Path,
    *,
    n_songs: int,
    seed: int,
    duration_s: float = 6.0,
    sample_rate: int = 24000,
    fmt: str = "wav",
    generators: Sequence[GeneratorSpec] = DEFAULT_GENERATORS,
    start: datetime | None = None,
    span_days: float = 28.0,
    workers: int = 1,
) -> CatalogResult:
    """Write ``audio/<song_id>.<fmt>``, ``catalog.parquet`` and ``catalog.json`` under ``out_dir``.

    Deterministic by ``seed`` (tables and audio bytes), whatever ``workers`` is;
    ``workers=0`` uses every core. Workers are spawned processes, so a script that asks
    for more than one must call this under ``if __name__ == "__main__":``. Existing files
    of the same names are overwritten; other files in ``out_dir/audio`` are left alone.
    """
    fmt = fmt.lower()
    if fmt not in ("wav", "flac"):
        raise ValueError("fmt must be 'wav' or 'flac'")
    if not duration_s > 0:
        raise ValueError("duration_s must be positive")
    if sample_rate < 8000:
        raise ValueError("sample_rate must be at least 8000 Hz")
    began = time.perf_counter()
    gens = _check_generators(generators)
    world = sample_world(n_songs=n_songs, seed=seed, generators=gens, start=start, span_days=span_days)
    out = Path(out_dir).resolve()
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    by_name = {g.name: g for g in gens}
    paths = [audio_dir / f"{sid}.{fmt}" for sid in world.song_ids]
    jobs = [
        _RenderJob(
            index=i,
            path=str(paths[i]),
            audio_seed=spec.audio_seed,
            qualities=tuple(float(v) for v in spec.qualities.as_array()),
            style=spec.style,
            duration_s=float(duration_s),
            sample_rate=int(sample_rate),
            lowpass_hz=by_name[spec.generator].lowpass_hz,
            fmt=fmt,
        )
        for i, spec in enumerate(world.specs)
    ]
    n_workers = (os.cpu_count() or 1) if workers <= 0 else workers
    results: list[tuple[int, float, int, str, str]] = []
    if n_workers == 1 or n_songs < 8:
        results = _render_chunk(jobs)
    else:
        chunk = max(1, min(32, n_songs // (4 * n_workers)))
        chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
        ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            for part in pool.map(_render_chunk, chunks):
                results.extend(part)
    results.sort(key=lambda r: r[0])

    table = _catalog_table(world, paths, results, duration_s, gens, span_days)
    catalog_path = out / "catalog.parquet"
    pq.write_table(table, catalog_path)
    meta = {
        "synthetic": True,
        "warning": "Synthetic songs from apexrank.synth: never mix with real data.",
        "world_version": WORLD_VERSION,
        "seed": seed,
        "n_songs": n_songs,
        "duration_s": duration_s,
        "sample_rate": sample_rate,
        "format": fmt,
        "start": _check_start(start).isoformat(),
        "span_days": span_days,
        "observed_at": world.observed_at.isoformat(),
        "generators": [asdict(g) for g in gens],
        "styles": sorted(STYLES),
        "qualities": list(QUALITY_NAMES),
        "label_weights": LABEL_WEIGHTS,
        "label_noise_sd": LABEL_NOISE_SD,
        "appeal_weights": APPEAL_WEIGHTS,
        "appeal_noise_sd": APPEAL_NOISE_SD,
        "like_probability": f"sigmoid({LIKE_INTERCEPT} + {LIKE_SLOPE} * appeal)",
        "streams": (f"NegBin(mean=exp(log_exposure + {STREAMS_APPEAL_SLOPE} * appeal), shape={STREAMS_GAMMA_SHAPE})"),
        "likes": "Binomial(streams, like_prob)",
    }
    metadata_path = out / "catalog.json"
    metadata_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return CatalogResult(
        out_dir=out,
        catalog_path=catalog_path,
        metadata_path=metadata_path,
        audio_dir=audio_dir,
        table=table,
        n_songs=n_songs,
        seed=seed,
        elapsed_s=time.perf_counter() - began,
    )


def _catalog_table(
    world: World,
    paths: Sequence[Path],
    rendered: Iterable[tuple[int, float, int, str, str]],
    duration_s: float,
    gens: Sequence[GeneratorSpec],
    span_days: float,
) -> Any:
    rendered = list(rendered)
    n = len(world.song_ids)
    columns: dict[str, Any] = {
        "song_id": pa.array(world.song_ids, pa.string()),
        "audio_uri": pa.array([p.as_uri() for p in paths], pa.string()),
        "generator": pa.array([s.generator for s in world.specs], pa.string()),
        "created_at": pa.array(world.created_at, pa.timestamp("us", tz="UTC")),
        "duration_s": pa.array(np.full(n, float(duration_s)), pa.float64()),
        "style": pa.array([s.style for s in world.specs], pa.string()),
        "streams": pa.array(world.streams, pa.int64()),
        "likes": pa.array(world.likes, pa.int64()),
    }
    for label in AESTHETIC_NAMES:
        columns[label] = pa.array(world.labels[label], pa.float64())
    columns["synthetic"] = pa.array(np.ones(n, dtype=bool), pa.bool_())
    for i, name in enumerate(QUALITY_NAMES):
        columns[f"latent_{name}"] = pa.array(world.qualities[:, i], pa.float64())
    columns["latent_appeal"] = pa.array(world.appeal, pa.float64())
    columns["latent_like_prob"] = pa.array(world.like_prob, pa.float64())
    columns["latent_log_exposure"] = pa.array(world.log_exposure, pa.float64())
    columns["latent_tempo_bpm"] = pa.array([r[1] for r in rendered], pa.float64())
    columns["latent_key"] = pa.array([r[2] for r in rendered], pa.int8())
    columns["latent_mode"] = pa.array([r[3] for r in rendered], pa.string())
    columns["latent_lead"] = pa.array([r[4] for r in rendered], pa.string())
    columns["latent_audio_seed"] = pa.array([s.audio_seed for s in world.specs], pa.int64())
    table = pa.table(columns)
    return table.replace_schema_metadata(
        {
            "apexrank.synthetic": "true",
            "apexrank.world_version": str(WORLD_VERSION),
            "apexrank.seed": str(world.seed),
            "apexrank.generators": ",".join(g.name for g in gens),
            "apexrank.observed_at": world.observed_at.isoformat(),
            "apexrank.span_days": repr(span_days),
        }
    )


def read_catalog(path: Path) -> Any:
    """Read a simulated ``catalog.parquet`` (or its folder), refusing anything not marked synthetic."""
    p = Path(path)
    if p.is_dir():
        p = p / "catalog.parquet"
    table = pq.read_table(p)
    meta = table.schema.metadata or {}
    if meta.get(b"apexrank.synthetic") != b"true":
        raise ValueError(f"{p} is not a synthetic apexrank catalogue")
    return table
