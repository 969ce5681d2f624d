"""The three paths whose outputs ``scores.json`` freezes, run on a fixed seeded catalogue.

1. **ingest**: 12 songs published to ``songs.generated`` and scored by the real
   :class:`consumers.worker.Worker` (logmel encoder, a seeded head with a target transform,
   promoted as ``models/current``): per song, what the worker stored in Redis
   (``score.<task>``, ``rank_score``, ``prior.like_rate``, ``model_version``) and the
   default feed's order.
2. **feed**: engagement counted for 8 of the songs (one counter call, then the feed updater
   the feedback consumer calls), then two pages of the default feed read through
   :class:`ranker.serving.reader.FeedReader` at a fixed clock with a seeded exploration RNG (the
   near-duplicate rule reads the stored song vectors): ordered ids, scores and components.
3. **retrain**: ``consumers.retrain.rescore_window`` with another seeded head (a newly
   promoted model), then the songs' stored records and the default feed's first page again.

Everything that depends on the wall clock is relative: songs are created 1-56 hours before
an anchor taken at the start of the run, and pages are served 10 minutes after it. So the
outputs are the same on any day.

Product code is reached only through entry points that survive the refactor of issue 13:
``Worker``, ``FeedReader``, ``FeedWriter.on_engagement``, ``rescore_window``, the stores and
the model artifact API. ``make_golden`` (a script) and ``tests/test_golden.py`` both call
:func:`run_paths`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from consumers.publish import publish_events
from consumers.retrain import rescore_window
from consumers.worker import Worker
from indexes import ScoreStore, open_engagement_counters
from indexes.embedding_index import EmbeddingIndex
from ranker import stores
from ranker.encoders import build_encoder
from ranker.events import TASKS, SongGenerated
from ranker.model.artifact import ScoringModel
from ranker.model.registry import promote
from ranker.model.targets import TargetTransform
from ranker.serving.reader import FeedPage, FeedReader
from ranker.serving.writer import FeedWriter
from ranker.settings import (
    ApiSettings,
    AudioSettings,
    FeedSettings,
    IndexSettings,
    ModelSettings,
    RetrainSettings,
    Settings,
)
from tests.helpers import DictVectors, tone

FORMAT = 1
N_SONGS = 12
GENERATORS = ("suno-v5", "udio-v2", "riffusion")
INGEST_SEED = 42  # the head the worker scores with
RESCORE_SEED = 7  # the head promoted before the rescore
SERVE_AFTER_S = 600.0  # pages are served this long after the anchor
PAGE = 6
#: Hash fields the worker and the rescore write per song (the scores, the rank score, the prior).
SONG_FIELDS = (*(f"score.{t}" for t in TASKS), "rank_score", "prior.like_rate")


def configure(settings: Settings) -> Settings:
    """``settings`` (servers, topics, key prefix, directories) with everything that shapes the outputs fixed."""
    return settings.model_copy(
        update={
            "dev_mode": True,  # file:// audio under the run's directory
            "encoder": "logmel",
            "model": ModelSettings(logmel_n_mels=32),
            "audio": AudioSettings(),
            "feed": FeedSettings(),
            "retrain": RetrainSettings(),
            "index": IndexSettings(path=settings.index.path, factory="Flat", use_gpu="never"),
            "api": ApiSettings(page_cache_ttl_s=0.0),
        }
    )


def songs(audio_dir: Path, anchor: float) -> list[SongGenerated]:
    """The catalogue: tones of different pitch, length and noise, made 1-56 hours before ``anchor``."""
    audio_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(N_SONGS):
        path = tone(audio_dir / f"g{i:02d}.wav", seconds=1.5 + 0.25 * (i % 4), freq=110.0 * 2 ** (i / 3), seed=i)
        out.append(
            SongGenerated(
                song_id=f"golden-{i:02d}",
                audio_uri=path.as_uri(),
                generator=GENERATORS[i % len(GENERATORS)],
                created_at=datetime.fromtimestamp(anchor, UTC) - timedelta(hours=1 + 5 * i, minutes=7 * i),
            )
        )
    return out


def target_transform() -> dict[str, Any]:
    """A percentile-power transform with a like-rate curve, fitted on seeded counts."""
    rng = np.random.default_rng(3)
    streams = rng.lognormal(6, 1.5, 4000).round()
    likes = (streams * rng.beta(2, 30, 4000)).round()
    return TargetTransform.fit({"streams": streams, "likes": likes}).to_dict()


def seeded_model(settings: Settings, seed: int) -> ScoringModel:
    encoder = build_encoder(settings)
    head = ScoringModel.from_seed(encoder.dim, seed, encoder.encoder_id, n_layers=encoder.n_layers, layers=None)
    return head.with_target_transform(target_transform(), {"golden": f"seed {seed}"})


def engagement(ids: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Plays, likes and a few of the other events for the first 8 songs: (song ids, event ids, types)."""
    song_ids, event_ids, types = [], [], []
    for i, sid in enumerate(ids[:8]):
        plays = 6 + (7 * i) % 19
        likes = (3 * i) % 5 if i % 2 else (i * 5) % 11
        kinds = ["play"] * plays + ["like"] * likes + ["skip"] * (i % 3) + ["complete"] * (i % 4)
        for k, kind in enumerate(kinds):
            song_ids.append(sid)
            event_ids.append(f"{sid}-e{k}")
            types.append(kind)
    return song_ids, event_ids, types


class StoredVectors(DictVectors):
    """The feed's near-duplicate rule reads song vectors; these are the worker's, read back once."""


def stored_vectors(settings: Settings, ids: Sequence[str]) -> StoredVectors:
    encoder = build_encoder(settings)
    index = EmbeddingIndex(settings.index_dir, dim=encoder.vector_dim, factory="Flat", use_gpu="never")
    try:
        got = index.store.get_many(list(ids))
    finally:
        index.close()
    return StoredVectors({s: got[s].record.vector.astype(np.float32) for s in ids if s in got})


def page_items(page: FeedPage) -> list[dict[str, Any]]:
    return [
        {"song_id": it["song_id"], "score": it["score"], "explore": it["explore"], "components": it["components"]}
        for it in page.items
    ]


def read_pages(
    settings: Settings, store: ScoreStore, vectors: StoredVectors, at: float, seed: int, pages: int
) -> list[list[dict[str, Any]]]:
    """``pages`` consecutive pages of the default feed at clock ``at``, exploring with a seeded RNG."""

    async def read() -> list[list[dict[str, Any]]]:
        reads = store.async_reads()
        try:
            reader = FeedReader(settings, reads, vectors, clock=lambda: at)
            await reader.sync.load()
            rng = np.random.default_rng(seed)
            out, cursor = [], None
            for _ in range(pages):
                page = await reader.page(settings.feed.name, PAGE, cursor, rng=rng)
                out.append(page_items(page))
                cursor = page.next_cursor
            return out
        finally:
            await reads.close()

    return asyncio.run(read())


def stored_songs(store: ScoreStore, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for sid, rec in zip(ids, store.get_songs(list(ids)), strict=True):
        assert rec is not None, f"{sid} was not stored"
        out[sid] = {f: float(rec[f]) for f in SONG_FIELDS} | {"model_version": rec["model_version"]}
    return out


def run_paths(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Run the three paths against ``settings``' servers (a fresh key prefix and directories)."""
    settings = configure(settings)
    anchor = float(int(datetime.now(UTC).timestamp()))
    serve_at = anchor + SERVE_AFTER_S
    events = songs(workdir / "audio", anchor)
    ids = [e.song_id for e in events]
    models_root = settings.state_dir / "models"
    ingest_model = seeded_model(settings, INGEST_SEED)
    promote(models_root, ingest_model.save_versioned(models_root))

    # 1. ingest: the worker, from Kafka to Redis and the index.
    publish_events(settings, events)
    worker = Worker(settings)
    stats = worker.run(until_idle_s=2.0, until_caught_up=True)
    assert stats.scored == N_SONGS and stats.dead_letters == 0, stats
    assert worker.model.version == ingest_model.version
    store = stores.score_store(settings)
    try:
        ingest = {
            "model_version": ingest_model.version,
            "songs": stored_songs(store, ids),
            "feed_order": [s for s, _ in store.feed_page(settings.feed.name, 0, 100)],
        }

        # 2. feed: engagement for some songs, then pages as the API serves them.
        counters = open_engagement_counters(
            settings.redis.url.get_secret_value(), key_prefix=settings.redis.key_prefix, dedup_window_s=3600
        )
        try:
            song_ids, event_ids, types = engagement(ids)
            counters.count(song_ids, event_ids, types, [f"0:{i}" for i in range(len(types))], "golden")
        finally:
            counters.close()
        FeedWriter(settings, store).on_engagement(sorted(set(song_ids)), now=anchor + 60.0)
        vectors = stored_vectors(settings, ids)
        feed = {
            "pages": read_pages(settings, store, vectors, serve_at, seed=2024, pages=2),
            "feed_order": [s for s, _ in store.feed_page(settings.feed.name, 0, 100)],
        }

        # 3. retrain: a newly promoted head rescores the cold-start window.
        rescore_model = seeded_model(settings, RESCORE_SEED)
        rescored = rescore_window(settings, rescore_model, store)
        retrain = {
            "model_version": rescore_model.version,
            "rescored": rescored,
            "songs": stored_songs(store, ids),
            "pages": read_pages(settings, store, vectors, serve_at, seed=99, pages=1),
            "feed_order": [s for s, _ in store.feed_page(settings.feed.name, 0, 100)],
        }
    finally:
        store.close()
    return {"format": FORMAT, "ingest": ingest, "feed": feed, "retrain": retrain}
