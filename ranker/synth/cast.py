"""The synthetic world's cast: generators, styles, hidden qualities, and each new song's spec.

Steps 1-3 of the generative story (world version 1); step 4 is in
:mod:`ranker.synth.compose` and :mod:`ranker.synth.render`, steps 5-7 in
:mod:`ranker.synth.world`.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
QUALITY_CONCENTRATION = 3.0


@dataclass(frozen=True)
class GeneratorSpec:
    """A synthetic song generator: its market share, skill, reach and audio bandwidth."""

    name: str
    share: float
    skill: float = 0.0  # added to good qualities' means, subtracted from noise's
    log_exposure: float = 5.0  # log of the typical listeners a week-old song reaches
    growth_per_week: float = 0.0  # platform growth: newer songs reach more listeners
    lowpass_hz: float | None = None  # band limit of the generator's audio, None = full band
    #: Qualities this generator renders inverted (q -> 1 - q): its audio-to-quality mapping differs.
    inverted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [q for q in self.inverted if q not in QUALITY_NAMES]
        if unknown:
            raise ValueError(f"unknown qualities {unknown} to invert; known: {list(QUALITY_NAMES)}")
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

#: A generator whose audio-to-quality mapping differs from the others' (issue 17's holdout): its
#: songs' consonance is rendered inverted, so a consonant-sounding song of it is truly a dissonant
#: one (its labels and audience follow the hidden quality, not the sound), with an 8 kHz band limit
#: that sits between b's and c's. Not in DEFAULT_GENERATORS: worlds drawn before it are unchanged.
NOVEL_GENERATOR = GeneratorSpec(
    "synthetic-novel", share=0.2, log_exposure=5.0, growth_per_week=0.1, lowpass_hz=8_000.0, inverted=("consonance",)
)
WITH_NOVEL_GENERATOR: tuple[GeneratorSpec, ...] = (*DEFAULT_GENERATORS, NOVEL_GENERATOR)


def rendered_qualities(generator: GeneratorSpec, qualities: npt.ArrayLike) -> FloatArray:
    """The qualities a generator's audio expresses: its ``inverted`` ones flipped, the rest as they are."""
    q = np.array(qualities, dtype=np.float64)
    for name in generator.inverted:
        q[..., QUALITY_NAMES.index(name)] = 1.0 - q[..., QUALITY_NAMES.index(name)]
    return q


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
