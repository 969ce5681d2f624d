"""Writing a synthetic song's score: the notes, where consonance, steadiness and repetition act.

The first half of step 4 of the generative story, told in :mod:`ranker.synth.render`;
what each quality does to the notes is listed in :mod:`ranker.synth.cast`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ranker.synth.cast import FloatArray, Qualities, _style

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


def _as_rng(value: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
    if isinstance(value, np.random.Generator):
        return value
    return np.random.default_rng(value)
