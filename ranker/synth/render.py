"""Rendering a score to sound: where noise and smoothness act, and a generator leaves its fingerprint.

Step 4 of the generative story (world version 1; the score is written in
:mod:`ranker.synth.compose`):

4. **Audio** (:func:`synthesize_song` = :func:`compose_song` + :func:`render_composition`):
   a score (tempo, key, mode, motif, chords, bass, drums) drawn from the song's own seed,
   rendered by wavetable additive synthesis with envelopes, synthetic drums (pitch-swept
   kick, noise snare, hi-hat or shaker), the style's noise-burst reverb, the damage
   of step 3, the generator's low-pass, then peak normalisation to 0.89. Mono float32, 24 kHz
   by default. Every random draw is made whatever the qualities are, so one seed with
   different qualities gives a *counterfactual twin*: the same song, differently damaged.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from ranker.synth.cast import (
    DEFAULT_GENERATORS,
    FloatArray,
    GeneratorSpec,
    Qualities,
    _pick_generator,
    _style,
    rendered_qualities,
)
from ranker.synth.compose import Composition, Part, _sub_rngs, compose_song

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
    if generator is not None:
        spec = _pick_generator(generators, generator)
        qualities = rendered_qualities(spec, Qualities.coerce(qualities).as_array())
    comp = compose_song(rng_or_seed, qualities, style, duration_s)
    lowpass = None if generator is None else spec.lowpass_hz
    return render_composition(comp, sample_rate, lowpass_hz=lowpass).astype(np.float32)
