"""The synthetic music world: deterministic, marked synthetic, heavy-tailed, and its qualities audible.

Audibility is checked with counterfactual twins (one seed, one quality changed) and
plain numpy measures an encoder could learn: log-mel band statistics, energy outside
the key, onset alignment with the beat grid, and self-similarity at the motif's period.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from ranker import synth
from ranker.events import AESTHETIC_TASKS

SR = 24000
N_SONGS = 40
DURATION = 2.0
SEED = 7
START = datetime(2026, 3, 2, tzinfo=UTC)
BASE = {"consonance": 0.7, "steadiness": 0.8, "repetition": 0.6, "noise": 0.2, "smoothness": 0.7}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _digests(audio_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(audio_dir.iterdir())}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> synth.CatalogResult:
    out = tmp_path_factory.mktemp("catalog")
    return synth.simulate_catalog(out, n_songs=N_SONGS, seed=SEED, duration_s=DURATION, start=START)


def _columns(table: Any) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# --------------------------------------------------------------------------- the catalogue


def test_catalog_columns_types_and_ranges(catalog: synth.CatalogResult) -> None:
    table = pq.read_table(catalog.catalog_path)
    schema = table.schema
    expected = {
        "song_id": pa.string(),
        "audio_uri": pa.string(),
        "generator": pa.string(),
        "created_at": pa.timestamp("us", tz="UTC"),
        "duration_s": pa.float64(),
        "style": pa.string(),
        "streams": pa.int64(),
        "likes": pa.int64(),
        "synthetic": pa.bool_(),
        **{name: pa.float64() for name in AESTHETIC_TASKS},
        **{f"latent_{name}": pa.float64() for name in synth.QUALITY_NAMES},
        "latent_appeal": pa.float64(),
        "latent_like_prob": pa.float64(),
    }
    for name, dtype in expected.items():
        assert schema.field(name).type == dtype, name
    assert table.num_rows == N_SONGS
    assert schema.metadata[b"apexrank.synthetic"] == b"true"

    cols = _columns(table)
    assert list(cols["song_id"]) == [f"syn-{SEED}-{i:06d}" for i in range(N_SONGS)]
    assert all(g.startswith("synthetic") for g in cols["generator"])
    assert cols["synthetic"].all()
    assert set(cols["style"]) <= set(synth.STYLES)
    assert np.all(cols["duration_s"] == DURATION)
    assert np.all(cols["streams"] >= 0) and np.all(cols["likes"] >= 0)
    assert np.all(cols["likes"] <= cols["streams"])
    for name in AESTHETIC_TASKS:
        assert np.all((cols[name] >= 1.0) & (cols[name] <= 5.0)), name
    for name in synth.QUALITY_NAMES:
        assert np.all((cols[f"latent_{name}"] >= 0.0) & (cols[f"latent_{name}"] <= 1.0)), name
    assert np.all((cols["latent_like_prob"] > 0.0) & (cols["latent_like_prob"] < 1.0))
    created = table.column("created_at").to_pylist()
    assert all(c.tzinfo is not None for c in created)
    assert created == sorted(created)
    assert created[0] >= START and created[-1] <= START + timedelta(days=28)

    for uri in cols["audio_uri"]:
        assert uri.startswith("file:///")
        path = Path(uri[len("file://") :])
        assert path.parent == catalog.audio_dir and path.exists()
    info = sf.info(str(catalog.audio_dir / f"syn-{SEED}-000000.wav"))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (
        SR,
        1,
        int(DURATION * SR),
        "PCM_16",
    )
    with sf.SoundFile(str(catalog.audio_dir / f"syn-{SEED}-000000.wav")) as handle:
        assert "synthetic" in handle.comment

    meta = catalog.metadata_path.read_text()
    assert '"synthetic": true' in meta and f'"seed": {SEED}' in meta
    assert synth.read_catalog(catalog.out_dir).num_rows == N_SONGS


def test_same_seed_same_bytes_other_seed_differs(catalog: synth.CatalogResult, tmp_path: Path) -> None:
    again = synth.simulate_catalog(
        tmp_path / "again", n_songs=N_SONGS, seed=SEED, duration_s=DURATION, start=START, workers=2
    )
    first, second = pq.read_table(catalog.catalog_path), pq.read_table(again.catalog_path)
    # Only the absolute paths differ between the two folders.
    assert first.drop_columns(["audio_uri"]).equals(second.drop_columns(["audio_uri"]))
    names = [Path(u).name for u in first.column("audio_uri").to_pylist()]
    assert names == [Path(u).name for u in second.column("audio_uri").to_pylist()]
    assert _digests(catalog.audio_dir) == _digests(again.audio_dir)  # with one worker and with two
    assert catalog.metadata_path.read_text() == again.metadata_path.read_text()

    other = synth.simulate_catalog(tmp_path / "other", n_songs=4, seed=SEED + 1, duration_s=DURATION, start=START)
    other_cols = _columns(other.table)
    assert not np.array_equal(other_cols["latent_consonance"], _columns(first)["latent_consonance"][:4])
    mine = _digests(catalog.audio_dir)
    for name, digest in _digests(other.audio_dir).items():
        assert digest not in mine.values(), name


def test_flac_output(tmp_path: Path) -> None:
    a = synth.simulate_catalog(tmp_path / "a", n_songs=2, seed=3, duration_s=1.0, fmt="flac", sample_rate=16000)
    b = synth.simulate_catalog(tmp_path / "b", n_songs=2, seed=3, duration_s=1.0, fmt="flac", sample_rate=16000)
    assert _digests(a.audio_dir) == _digests(b.audio_dir)
    audio, sr = sf.read(str(a.audio_dir / "syn-3-000000.flac"))
    assert sr == 16000 and audio.shape == (16000,)


def test_generators_must_be_synthetic() -> None:
    assert all(g.name.startswith("synthetic") for g in synth.DEFAULT_GENERATORS)
    with pytest.raises(ValueError, match="synthetic"):
        synth.GeneratorSpec("suno-v5", share=1.0)


def test_read_catalog_refuses_unmarked_tables(tmp_path: Path) -> None:
    pq.write_table(pa.table({"song_id": ["real-1"]}), tmp_path / "catalog.parquet")
    with pytest.raises(ValueError, match="not a synthetic"):
        synth.read_catalog(tmp_path)


def test_aesthetic_names_match_the_model_tasks() -> None:
    assert synth.AESTHETIC_NAMES == AESTHETIC_TASKS


# --------------------------------------------------------------------------- labels and counts


def test_streams_are_heavy_tailed_and_likes_follow_like_prob() -> None:
    world = synth.sample_world(n_songs=3000, seed=11)
    streams = np.sort(world.streams)[::-1]
    assert streams[:30].sum() / streams.sum() > 0.15  # top 1 % hold far more than 1 %
    assert streams[:300].sum() / streams.sum() > 0.5
    assert np.median(streams) < streams.mean() / 3
    assert np.all(world.likes <= world.streams)
    busy = world.streams >= 2000
    rate = world.likes[busy] / world.streams[busy]
    sd = np.sqrt(world.like_prob[busy] * (1 - world.like_prob[busy]) / world.streams[busy])
    assert np.all(np.abs(rate - world.like_prob[busy]) < 5 * sd)
    assert 0.03 < float(np.median(world.like_prob)) < 0.15


def test_an_audience_with_other_tastes_weighs_the_qualities_its_own_way() -> None:
    q = np.array([[0.9, 0.5, 0.5, 0.1, 0.5], [0.2, 0.5, 0.5, 0.1, 0.5]])  # consonant vs dissonant, else equal
    styles = ["pop", "pop"]
    same = synth.appeal_scores(q, styles, np.random.default_rng(0), noise_sd=0.0, weights=synth.APPEAL_WEIGHTS)
    np.testing.assert_array_equal(same, synth.appeal_scores(q, styles, np.random.default_rng(0), noise_sd=0.0))
    deaf = dict(synth.APPEAL_WEIGHTS, consonance=0.0)
    other = synth.appeal_scores(q, styles, np.random.default_rng(0), noise_sd=0.0, weights=deaf)
    assert same[0] > same[1] and other[0] == pytest.approx(other[1])
    with pytest.raises(ValueError, match="unknown appeal weights"):
        synth.appeal_scores(q, styles, np.random.default_rng(0), weights={"loudness": 1.0})


def test_labels_follow_their_driving_qualities() -> None:
    world = synth.sample_world(n_songs=1000, seed=5)
    q = {name: world.qualities[:, i] for i, name in enumerate(synth.QUALITY_NAMES)}
    drivers = {
        "coherence": q["repetition"],
        "musicality": q["consonance"],
        "memorability": q["repetition"],
        "clarity": 1.0 - q["noise"],
        "naturalness": q["smoothness"],
    }
    for label, driver in drivers.items():
        assert _spearman(world.labels[label], driver) > 0.5, label
    assert _spearman(world.labels["coherence"], q["steadiness"]) > 0.3
    assert _spearman(world.appeal, world.streams) > 0.3


# --------------------------------------------------------------------------- songs


def test_synthesize_song_contract() -> None:
    a = synth.synthesize_song(1, BASE, "pop", duration_s=1.5)
    assert a.dtype == np.float32 and a.shape == (int(1.5 * SR),)
    assert np.isfinite(a).all() and 0.5 < np.abs(a).max() <= 0.9
    assert np.array_equal(a, synth.synthesize_song(1, BASE, "pop", duration_s=1.5))
    assert not np.array_equal(a, synth.synthesize_song(2, BASE, "pop", duration_s=1.5))
    low = synth.synthesize_song(np.random.default_rng(1), BASE, "folk", 1.0, 16000, generator="synthetic-c")
    assert low.shape == (16000,)
    spec = synth.sample_song_spec(np.random.default_rng(0), style="lofi", generator="synthetic-b")
    assert (spec.style, spec.generator) == ("lofi", "synthetic-b")
    with pytest.raises(ValueError):
        synth.synthesize_song(1, {**BASE, "noise": 1.5}, "pop")
    with pytest.raises(ValueError):
        synth.synthesize_song(1, BASE, "polka")


def test_counterfactual_twins_share_the_score() -> None:
    """One seed with another noise level is the same song; consonance moves pitches only."""
    clean = synth.compose_song(3, BASE, "pop", 4.0)
    noisy = synth.compose_song(3, {**BASE, "noise": 0.9}, "pop", 4.0)
    sour = synth.compose_song(3, {**BASE, "consonance": 0.1}, "pop", 4.0)
    assert (clean.tempo_bpm, clean.key, clean.mode) == (sour.tempo_bpm, sour.key, sour.mode)
    for p, q, r in zip(clean.parts, noisy.parts, sour.parts, strict=True):
        assert np.array_equal(p.pitches, q.pitches) and np.array_equal(p.onsets, q.onsets)
        assert np.array_equal(p.onsets, r.onsets)
    assert not np.array_equal(clean.parts[0].pitches, sour.parts[0].pitches)


# --------------------------------------------------------------------------- audibility

_STYLES = ("pop", "electronic", "folk", "lofi", "ambient", "pop")


def _twins(quality: str, low: float, high: float, duration: float = 4.0) -> list[tuple[Any, ...]]:
    """(low song, high song, composition) for six seeds across the styles."""
    out = []
    for seed, style in enumerate(_STYLES):
        lo_q, hi_q = {**BASE, quality: low}, {**BASE, quality: high}
        lo = synth.synthesize_song(seed, lo_q, style, duration).astype(np.float64)
        hi = synth.synthesize_song(seed, hi_q, style, duration).astype(np.float64)
        out.append((lo, hi, synth.compose_song(seed, hi_q, style, duration)))
    return out


def _mel_filters(n_fft: int = 1024, n_mels: int = 32) -> np.ndarray:
    mel = np.linspace(2595 * np.log10(1 + 30 / 700), 2595 * np.log10(1 + SR / 2 / 700), n_mels + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    f = np.fft.rfftfreq(n_fft, 1 / SR)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.clip(np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)), 0, None)


_MEL = _mel_filters()


def _logmel_stats(y: np.ndarray) -> dict[str, np.ndarray]:
    """What a log-mel statistics encoder sees: per band mean, std over time and frame flux."""
    frames = np.lib.stride_tricks.sliding_window_view(y, 1024)[::480] * np.hanning(1024)
    logmel = np.log((np.abs(np.fft.rfft(frames, axis=1)) ** 2) @ _MEL.T + 1e-6)
    logmel -= logmel.mean()  # gain-invariant
    return {
        "mean": logmel.mean(0),
        "std": logmel.std(0),
        "flux": np.abs(np.diff(logmel, axis=0)).mean(0),
    }


def test_noise_is_audible_in_logmel_statistics(catalog: synth.CatalogResult) -> None:
    for lo, hi, _ in _twins("noise", 0.05, 0.9):
        quiet, loud = _logmel_stats(lo), _logmel_stats(hi)
        assert loud["mean"][-8:].mean() > quiet["mean"][-8:].mean() + 0.3  # more top-band energy
        assert loud["std"].mean() < quiet["std"].mean()  # the noise floor fills the gaps
    # Across random songs of every style and generator too: band dynamics alone rank the noise.
    table = catalog.table
    ids = table.column("song_id").to_pylist()
    dynamics = np.array([_logmel_stats(sf.read(str(catalog.audio_dir / f"{i}.wav"))[0])["std"].mean() for i in ids])
    assert _spearman(-dynamics, table.column("latent_noise").to_numpy()) > 0.5


def _out_of_key_energy(y: np.ndarray, key: int, mode: str) -> float:
    """Share of 60 Hz-4 kHz spectral energy whose nearest pitch class is outside the key."""
    power = np.abs(np.fft.rfft(y * np.hanning(y.size))) ** 2
    f = np.fft.rfftfreq(y.size, 1 / SR)
    band = (f > 60) & (f < 4000)
    pitch_class = np.round(12 * np.log2(f[band] / 440.0) + 9).astype(int) % 12  # 0 = C
    chroma = np.bincount(pitch_class, weights=power[band], minlength=12)
    scale = np.array([0, 2, 4, 5, 7, 9, 11] if mode == "major" else [0, 2, 3, 5, 7, 8, 10])
    in_key = np.zeros(12, dtype=bool)
    in_key[(scale + key) % 12] = True
    return float(chroma[~in_key].sum() / chroma.sum())


def test_out_of_key_notes_are_audible() -> None:
    for sour, sweet, comp in _twins("consonance", 0.05, 0.95):
        assert _out_of_key_energy(sour, comp.key, comp.mode) > _out_of_key_energy(sweet, comp.key, comp.mode)


def _grid_lock(y: np.ndarray, tempo_bpm: float, hop: int = 120, n_fft: int = 512) -> float:
    """How strongly onset energy (spectral flux) locks to the sixteenth-note grid (0-1)."""
    frames = np.lib.stride_tricks.sliding_window_view(y, n_fft)[::hop] * np.hanning(n_fft)
    logspec = np.log(np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-8)
    flux = np.maximum(np.diff(logspec, axis=0), 0).sum(1)
    flux = np.maximum(flux - np.median(flux), 0)
    t = (np.arange(flux.size) + 1) * hop / SR + n_fft / 2 / SR
    return float(np.abs((flux * np.exp(2j * np.pi * t * tempo_bpm * 4 / 60)).sum()) / flux.sum())


def test_unsteady_timing_is_audible() -> None:
    for seed, style in enumerate(("pop", "electronic", "folk", "pop")):
        shaky, steady = ({**BASE, "steadiness": s} for s in (0.05, 0.95))
        comp = synth.compose_song(seed, steady, style, 4.0)
        lock_steady = _grid_lock(synth.synthesize_song(seed, steady, style, 4.0).astype(np.float64), comp.tempo_bpm)
        lock_shaky = _grid_lock(synth.synthesize_song(seed, shaky, style, 4.0).astype(np.float64), comp.tempo_bpm)
        assert lock_steady > lock_shaky + 0.1, style


def _lag_similarity(y: np.ndarray, lag_s: float, hop: int = 240, n_fft: int = 2048) -> float:
    """Mean cosine similarity of log-spectrum frames one motif apart."""
    frames = np.lib.stride_tricks.sliding_window_view(y, n_fft)[::hop] * np.hanning(n_fft)
    spec = np.log(np.abs(np.fft.rfft(frames, axis=1))[:, 5:400] + 1e-3)
    spec -= spec.mean(1, keepdims=True)
    spec /= np.linalg.norm(spec, axis=1, keepdims=True) + 1e-9
    lag = round(lag_s * SR / hop)
    return float((spec[:-lag] * spec[lag:]).sum(1).mean())


def test_motif_repetition_is_audible() -> None:
    gains = []
    for fresh, repeated, comp in _twins("repetition", 0.05, 0.95, duration=6.0):
        beat = 60.0 / comp.tempo_bpm
        motif_s = (4 if comp.duration_s / beat >= 12 else 2) * beat
        gains.append(_lag_similarity(repeated, motif_s) - _lag_similarity(fresh, motif_s))
    assert np.mean(gains) > 0.05 and sum(g > 0 for g in gains) >= 5, gains
