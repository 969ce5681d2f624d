"""A simulated catalogue on disk: audio files, ``catalog.parquet`` and ``catalog.json``, all marked synthetic.

The whole story is drawn by :func:`~ranker.synth.world.sample_world`; only the audio is
rendered here, in spawned worker processes when asked, and its bytes do not depend on how
many (see "Determinism" in :mod:`ranker.synth`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from ranker.synth.cast import (
    AESTHETIC_NAMES,
    DEFAULT_GENERATORS,
    QUALITY_NAMES,
    STYLES,
    SYNTHETIC_MARK,
    WORLD_VERSION,
    GeneratorSpec,
    _check_generators,
    rendered_qualities,
)
from ranker.synth.compose import compose_song
from ranker.synth.render import render_composition
from ranker.synth.world import (
    APPEAL_NOISE_SD,
    APPEAL_WEIGHTS,
    LABEL_NOISE_SD,
    LABEL_WEIGHTS,
    LIKE_INTERCEPT,
    LIKE_SLOPE,
    STREAMS_APPEAL_SLOPE,
    STREAMS_GAMMA_SHAPE,
    World,
    _check_start,
    sample_world,
)


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
            qualities=tuple(float(v) for v in rendered_qualities(by_name[spec.generator], spec.qualities.as_array())),
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
