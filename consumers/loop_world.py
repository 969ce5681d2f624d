"""The loop simulation's world: its knobs (:class:`LoopConfig`), songs, listeners and initial head.

Everything here is fixed by the seed before any policy runs: each song's style, audio, arrival
hour and true like probability, each listener's style, and the APEX head trained on a separate
synthetic history catalog. :mod:`consumers.simulate_loop` replays this world under each feed
policy (docs/loop-simulation.md). Kept apart from the run loop and the reporting so that each
module stays short. All of it is SYNTHETIC.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf

from ranker.settings import Settings
from ranker.synth import (
    APPEAL_WEIGHTS,
    NOVEL_GENERATOR,
    STYLES,
    WITH_NOVEL_GENERATOR,
    appeal_scores,
    like_probability,
    sample_song_spec,
    simulate_catalog,
    synthesize_song,
)

#: The new generator's name (LoopConfig.novel_from_h), for the modules the synth must not reach.
NOVEL: str = NOVEL_GENERATOR.name

#: The default listeners: against the history's audience (synth.APPEAL_WEIGHTS) they care much less about
#: consonance, dislike repetition, and weigh clean, smooth production more.
LISTENER_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("consonance", 0.2),
    ("steadiness", 0.6),
    ("repetition", -0.5),
    ("clean", 1.5),
    ("smoothness", 1.0),
)


@dataclass(frozen=True)
class LoopConfig:
    """The knobs of the simulation that are not part of the CLI (defaults are documented)."""

    page_size: int = 10  # songs a user is shown per simulated hour
    plays_per_user: int = 3  # of which they play this many, position-biased
    style_boost: float = 1.0  # log-odds added to a song's like probability for a user of its style
    history_songs: int = 600  # songs of the separate "history" catalog the initial head is trained on
    history_epochs: int = 60
    # A few hundred songs: small batches and a larger step (TrainConfig's 512 and 1e-4 make one step an epoch,
    # and the head barely leaves its initialisation), with early stopping on the validation songs.
    history_lr: float = 1e-3
    history_batch_size: int = 32
    history_patience: int = 10
    duration_s: float = 2.0  # length of every synthetic song
    retrain_every_h: int = 1
    retrain_min_plays: int = 4
    retrain_epochs: int = 20
    retrain_margin: float = 0.01  # the gate's margin (RetrainSettings' default)
    retrain_holdout_fraction: float = 0.2  # the newest share of the retraining songs the gate judges on (the default)
    retrain_lr: float | None = None  # None: TrainConfig's (1e-4); small retraining sets barely move at that rate
    retrain_batch_size: int | None = None  # None: TrainConfig's (512)
    retrain_targets: Literal["exposure", "counts"] = "exposure"  # RetrainSettings.targets
    retrain_likes_model: Literal["readout", "head"] = "readout"  # RetrainSettings.likes_model
    #: The feed's freshness half-life in simulated hours. A run compresses days of arrivals into a few hours, so
    #: the feed's freshness is scaled to the simulated clock (None: FeedPolicy's 72 h, no decay to speak of).
    half_life_hours: float | None = 2.0
    retrain_rate_prior_plays: float = 20.0
    idle_s: float = 0.8  # worker / feedback ``until_idle_s`` per simulated hour
    max_candidates: int = 2000  # random / newest: how much of the feed is fetched to be re-ordered
    #: The loop's listeners weigh the qualities differently from the history's audience (None, or
    #: ``--set audience_weights=history``: the same weights, synth.APPEAL_WEIGHTS). The initial head only knows
    #: the history's taste, as APEX knows the taste of Suno's and Udio's public; retraining can learn theirs.
    audience_weights: tuple[tuple[str, float], ...] | None = LISTENER_WEIGHTS
    #: Listeners with their own tastes (issue 16): the log-odds added to a like is taste_strength times the cosine
    #: between the listener's taste and the song's embedding (both centred on the world's mean song vector). A
    #: taste is its style cluster's centre plus individual noise of relative size taste_noise. 0: no taste term.
    taste_strength: float = 0.0
    taste_noise: float = 0.5
    #: Position-biased attention: a play at 0-based page position k turns into a like with the song's like
    #: probability times (1 + k) ** -examination_decay. 0: position does not change a like.
    examination_decay: float = 0.0
    #: The personal policy's feed.taste_weight and feed.taste_evidence_half (None: the product's defaults).
    taste_weight: float | None = None
    taste_evidence_half: float | None = None
    #: A new generator (issue 17): from this simulated hour on, novel_share of the arriving songs come from
    #: synth's synthetic-novel, whose audio renders consonance inverted (docs/model.md); -1: none. The initial
    #: head never saw it (the history catalog has the default generators only).
    novel_from_h: int = -1
    novel_share: float = 0.5
    #: Heads in the initial head's deep ensemble (1: a single head, no spread); it also fits the OOD model.
    history_ensemble: int = 1

    def __post_init__(self) -> None:
        counts: tuple[str, ...] = ("page_size", "plays_per_user", "history_songs", "history_epochs")
        counts += ("history_batch_size", "history_patience", "retrain_every_h", "retrain_min_plays")
        counts += ("retrain_epochs", "max_candidates")
        bad = [name for name in counts if getattr(self, name) < 1]
        if self.retrain_batch_size is not None and self.retrain_batch_size < 2:
            bad.append("retrain_batch_size")
        bad += [name for name in ("duration_s", "idle_s", "history_lr") if not getattr(self, name) > 0]
        if self.retrain_lr is not None and not self.retrain_lr > 0:
            bad.append("retrain_lr")
        if self.retrain_margin < 0:
            bad.append("retrain_margin")
        if not 0 < self.retrain_holdout_fraction < 1:
            bad.append("retrain_holdout_fraction")
        bad += [name for name in ("taste_strength", "taste_noise", "examination_decay") if getattr(self, name) < 0]
        if not 0 <= self.novel_share <= 1:
            bad.append("novel_share")
        if self.history_ensemble < 1:
            bad.append("history_ensemble")
        if self.retrain_rate_prior_plays < 0:
            bad.append("retrain_rate_prior_plays")
        if self.half_life_hours is not None and not self.half_life_hours > 0:
            bad.append("half_life_hours")
        if self.retrain_targets not in ("exposure", "counts"):
            bad.append("retrain_targets")
        if self.retrain_likes_model not in ("readout", "head"):
            bad.append("retrain_likes_model")
        if bad:
            raise ValueError(f"LoopConfig: {', '.join(bad)} out of range")
        unknown = sorted({name for name, _ in self.audience_weights or ()} - set(APPEAL_WEIGHTS))
        if unknown:
            raise ValueError(f"LoopConfig: unknown audience_weights {unknown}; known: {sorted(APPEAL_WEIGHTS)}")


def loop_config(overrides: Sequence[str]) -> LoopConfig:
    """A :class:`LoopConfig` with ``KEY=VALUE`` overrides (the CLI's ``--set``)."""
    hints = typing.get_type_hints(LoopConfig)
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, KEY one of {', '.join(sorted(hints))}")
        try:
            if key == "audience_weights" and raw == "history":
                values[key] = None
            elif key == "audience_weights":
                pairs = (part.split(":") for part in raw.split(","))
                values[key] = tuple((name.strip(), float(w)) for name, w in pairs)
            elif typing.get_origin(hints[key]) is Literal:
                values[key] = raw
            elif int in typing.get_args(hints[key]) or hints[key] is int:
                values[key] = int(raw)
            else:
                values[key] = float(raw)
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: {exc}") from None
    try:
        return LoopConfig(**values)
    except ValueError as exc:
        raise ValueError(f"--set: {exc}") from None


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class _Song:
    song_id: str
    style: str
    generator: str
    hour: int
    like_prob: float
    path: Path


@dataclass(frozen=True)
class _World:
    songs: list[_Song]
    user_styles: list[str]
    start: datetime  # created_at of hour 0; the last hour's songs are created about "now"
    #: With LoopConfig.taste_strength > 0: each listener's taste term for each song (users x songs, log-odds).
    taste: np.ndarray | None = None

    def affinity(self, user: int, song: int, cfg: LoopConfig) -> float:
        """The log-odds listener ``user`` adds to song ``song``'s like: its style boost and taste term."""
        s = self.songs[song]
        bonus = cfg.style_boost if self.user_styles[user] == s.style else 0.0
        return bonus + (float(self.taste[user, song]) if self.taste is not None else 0.0)

    def like_probability(self, user: int, song: int, cfg: LoopConfig, position: int = 0) -> float:
        """The chance that ``user`` likes ``song`` when playing it at ``position`` of a page."""
        p = 1.0 / (1.0 + math.exp(-(_logit(self.songs[song].like_prob) + self.affinity(user, song, cfg))))
        return p * (1.0 + position) ** -cfg.examination_decay


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _build_world(
    *, songs: int, users: int, hours: int, seed: int, out_dir: Path, cfg: LoopConfig, settings: Settings | None = None
) -> _World:
    audio = out_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    truth_rng = np.random.default_rng(np.random.SeedSequence([seed, 101]))
    out: list[_Song] = []
    novel_rng = np.random.default_rng(np.random.SeedSequence([seed, 104]))
    for i in range(songs):
        spec = sample_song_spec(np.random.default_rng(np.random.SeedSequence([seed, 100, i])))
        hour = i * hours // songs
        novel = novel_rng.random() < cfg.novel_share  # drawn for every song, so the world is the same either way
        if 0 <= cfg.novel_from_h <= hour and novel:
            spec = replace(spec, generator=NOVEL_GENERATOR.name)
        q = spec.qualities.as_array()[None, :]
        weights = dict(cfg.audience_weights) if cfg.audience_weights is not None else None
        p = float(like_probability(appeal_scores(q, [spec.style], truth_rng, weights=weights))[0])
        song_id = f"syn-loop-{seed}-{i:05d}"
        path = audio / f"{song_id}.wav"
        if not path.is_file():
            y = synthesize_song(
                spec.audio_seed,
                spec.qualities,
                spec.style,
                cfg.duration_s,
                generator=spec.generator,
                generators=WITH_NOVEL_GENERATOR,
            )
            sf.write(path, y, 24_000)
        out.append(_Song(song_id, spec.style, spec.generator, hour, p, path))
    names = list(STYLES)
    shares = np.array([STYLES[n].share for n in names])
    user_rng = np.random.default_rng(np.random.SeedSequence([seed, 102]))
    styles = [names[int(k)] for k in user_rng.choice(len(names), size=users, p=shares / shares.sum())]
    start = datetime.now(UTC) - timedelta(hours=hours)
    taste = _tastes(out, styles, seed, cfg, settings) if cfg.taste_strength > 0 and settings is not None else None
    return _World(out, styles, start, taste)


def _song_vectors(songs: Sequence[_Song], settings: Settings) -> np.ndarray:
    """The songs' unit embeddings as the worker makes them (the settings' encoder: logmel in the loop)."""
    from ranker.audio import load_song, segment_waveform
    from ranker.encoders import build_encoder
    from ranker.scoring import encode_songs

    encoder = build_encoder(settings)
    segments = []
    for s in songs:
        audio = load_song(s.path.as_uri(), settings.audio)
        segments.append(segment_waveform(audio.waveform, audio.sample_rate, settings.audio.segment_s))
    encoded = encode_songs(encoder, segments)
    return np.stack([e.vector for e in encoded if e.vector is not None]).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def _tastes(songs: list[_Song], styles: list[str], seed: int, cfg: LoopConfig, settings: Settings) -> np.ndarray:
    """Each listener's taste term for each song: taste_strength * cos(taste, song), centred embeddings.

    A style's cluster centre is the mean centred embedding of its songs; a listener's taste is their
    style's centre plus a random direction of relative size taste_noise (SeedSequence([seed, 103])).
    """
    vectors = _song_vectors(songs, settings)
    centred = _unit(vectors - vectors.mean(axis=0))
    names = sorted(set(styles) | {s.style for s in songs})
    centres = {
        n: _unit(centred[[i for i, s in enumerate(songs) if s.style == n]].mean(axis=0))
        for n in names
        if any(s.style == n for s in songs)
    }
    rng = np.random.default_rng(np.random.SeedSequence([seed, 103]))
    noise = _unit(rng.standard_normal((len(styles), centred.shape[1])))
    dim = centred.shape[1]
    base = np.stack([centres.get(st, np.zeros(dim)) for st in styles])
    tastes = _unit(base + cfg.taste_noise * noise)
    return np.asarray(cfg.taste_strength * tastes @ centred.T)


def _pretrain_head(settings: Settings, *, seed: int, out_dir: Path, cfg: LoopConfig) -> Any:
    """An APEX head trained on a separate synthetic history catalog, so the prior means something."""
    from ranker.embed import embed_catalog
    from ranker.features import load_features
    from ranker.model.train import train_head
    from ranker.model.train_config import TrainConfig

    catalog = simulate_catalog(
        out_dir / "history", n_songs=cfg.history_songs, seed=seed + 7919, duration_s=cfg.duration_s
    ).catalog_path
    feats = out_dir / "history-features"
    embed_catalog(catalog, feats, settings, progress=False)
    config = TrainConfig(
        epochs=cfg.history_epochs,
        patience=cfg.history_patience,
        lr=cfg.history_lr,
        batch_size=cfg.history_batch_size,
        seed=seed,
        ensemble=cfg.history_ensemble,
    )
    return train_head(load_features(feats), catalog, config).model


def audience_like_rates(world: _World, cfg: LoopConfig) -> dict[str, float]:
    """Each song's like rate over the whole audience: its listeners' like probabilities, averaged.

    What the feed's like rate measures, and what a head retrained on this audience can learn (the
    style boost included, which the history's targets do not have).
    """
    if world.taste is not None:  # every listener's own like probability, averaged (at the top of a page)
        n = len(world.user_styles)
        return {
            s.song_id: sum(world.like_probability(u, i, cfg) for u in range(n)) / n for i, s in enumerate(world.songs)
        }
    shares: dict[str, float] = {}
    for style in world.user_styles:
        shares[style] = shares.get(style, 0.0) + 1.0 / len(world.user_styles)
    return {
        s.song_id: sum(
            share / (1.0 + math.exp(-(_logit(s.like_prob) + (cfg.style_boost if style == s.style else 0.0))))
            for style, share in shares.items()
        )
        for s in world.songs
    }
