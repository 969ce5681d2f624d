"""``apexrank simulate loop``: the seeded feedback-loop simulation of the feed policies.

Everything runs on the real services: synthetic songs arrive each simulated hour on
``songs.generated`` (the real :class:`~consumers.worker.Worker` scores them), synthetic
users browse feeds through the HTTP API (FastAPI ``TestClient`` over
:func:`ranker.serving.api.create_app`) and send plays, likes and skips over Kafka to the engagement
topic (the real :class:`~consumers.feedback.FeedbackConsumer` counts them). The same world
(songs, users, their tastes, their random draws) is replayed under each policy, each in its
own namespace (topics, consumer groups, Redis key prefix, index and state directories).
docs/loop-simulation.md describes the design and its results. All of it is SYNTHETIC.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import all_topics, ensure_topics, flush_or_raise, make_producer
from consumers.publish import publish_events
from consumers.retrain import run_once
from consumers.worker import Worker
from ranker import stores
from ranker.events import Engagement, SongGenerated
from ranker.settings import (
    DEFAULT_FEED,
    ApiSettings,
    FeedPolicy,
    FeedSettings,
    IndexSettings,
    RedisSettings,
    RetrainSettings,
    Settings,
    TopicSettings,
)
from ranker.synth import (
    APPEAL_WEIGHTS,
    STYLES,
    appeal_scores,
    like_probability,
    sample_song_spec,
    simulate_catalog,
    synthesize_song,
)

log = logging.getLogger(__name__)

#: The policies compared, in the order the acceptance criterion ranks them (worst first).
POLICIES: tuple[str, ...] = ("random", "newest", "prior-only", "prior+evidence", "prior+evidence+retrain")
#: A prior strength so large that no amount of plays moves the posterior off the prior.
PRIOR_ONLY_STRENGTH = 1e12
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


@dataclass
class PolicyOutcome:
    """One policy's engagement, hour by hour."""

    plays: list[int] = field(default_factory=list)
    likes: list[int] = field(default_factory=list)
    expected_likes: list[float] = field(default_factory=list)  # sum of the true like probabilities played
    promotions: int = 0
    retrains: int = 0
    #: After each promotion: Spearman(the new head's prior like rate, audience like rate) over the songs so far
    #: (including the songs it was trained on).
    promoted_prior_spearman: list[float | None] = field(default_factory=list)
    first_promotion_hour: int | None = None
    #: At the end: Spearman(this policy's prior like rate, audience like rate) over the songs that arrived after
    #: the retrain policy's first promotion, which the first promoted head was not trained on (a later promotion
    #: may have trained on some of them; None without a promotion).
    late_prior_spearman: float | None = None

    @property
    def like_rate(self) -> float:
        plays = sum(self.plays)
        return sum(self.likes) / plays if plays else 0.0

    @property
    def expected_like_rate(self) -> float:
        """The mean true like probability of the songs played: the like rate without the coin flips."""
        plays = sum(self.plays)
        return sum(self.expected_likes) / plays if plays else 0.0

    def hourly_rates(self) -> list[float]:
        return [lk / p if p else 0.0 for p, lk in zip(self.plays, self.likes, strict=True)]

    def hourly_expected_rates(self) -> list[float]:
        return [lk / p if p else 0.0 for p, lk in zip(self.plays, self.expected_likes, strict=True)]


@dataclass
class LoopResult:
    """What :func:`run_loop_simulation` measured, and where it wrote it."""

    seed: int
    songs: int
    users: int
    hours: int
    outcomes: dict[str, PolicyOutcome]
    prior_spearman: float | None = None  # Spearman(prior like rate, true like probability) over the songs
    json_path: Path | None = None
    png_path: Path | None = None

    def like_rates(self) -> dict[str, float]:
        return {p: o.like_rate for p, o in self.outcomes.items()}

    def expected_like_rates(self) -> dict[str, float]:
        return {p: o.expected_like_rate for p, o in self.outcomes.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "songs": self.songs,
            "users": self.users,
            "hours": self.hours,
            "prior_spearman": self.prior_spearman,
            "like_rate": self.like_rates(),
            "expected_like_rate": self.expected_like_rates(),
            "hourly_like_rate": {p: o.hourly_rates() for p, o in self.outcomes.items()},
            "outcomes": {p: asdict(o) for p, o in self.outcomes.items()},
        }


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


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _build_world(*, songs: int, users: int, hours: int, seed: int, out_dir: Path, cfg: LoopConfig) -> _World:
    audio = out_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    truth_rng = np.random.default_rng(np.random.SeedSequence([seed, 101]))
    out: list[_Song] = []
    for i in range(songs):
        spec = sample_song_spec(np.random.default_rng(np.random.SeedSequence([seed, 100, i])))
        q = spec.qualities.as_array()[None, :]
        weights = dict(cfg.audience_weights) if cfg.audience_weights is not None else None
        p = float(like_probability(appeal_scores(q, [spec.style], truth_rng, weights=weights))[0])
        song_id = f"syn-loop-{seed}-{i:05d}"
        path = audio / f"{song_id}.wav"
        if not path.is_file():
            y = synthesize_song(spec.audio_seed, spec.qualities, spec.style, cfg.duration_s, generator=spec.generator)
            sf.write(path, y, 24_000)
        out.append(_Song(song_id, spec.style, spec.generator, i * hours // songs, p, path))
    names = list(STYLES)
    shares = np.array([STYLES[n].share for n in names])
    user_rng = np.random.default_rng(np.random.SeedSequence([seed, 102]))
    styles = [names[int(k)] for k in user_rng.choice(len(names), size=users, p=shares / shares.sum())]
    start = datetime.now(UTC) - timedelta(hours=hours)
    return _World(out, styles, start)


def _pretrain_head(settings: Settings, *, seed: int, out_dir: Path, cfg: LoopConfig) -> Any:
    """An APEX head trained on a separate synthetic history catalog, so the prior means something."""
    from ranker.features import embed_catalog, load_features
    from ranker.model.train import TrainConfig, train_head

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
    )
    return train_head(load_features(feats), catalog, config).model


# --------------------------------------------------------------------------- one namespace per policy


def _policy_settings(base: Settings, policy: str, out_dir: Path, cfg: LoopConfig) -> Settings:
    tag = f"loop-{policy.replace('+', '-')}-{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(
        songs_generated=f"{tag}.songs.generated",
        songs_scored=f"{tag}.songs.scored",
        dead_letter=f"{tag}.songs.dead-letter",
        engagement=f"{tag}.engagement",
        engagement_dead_letter=f"{tag}.engagement.dead-letter",
        models_promoted=f"{tag}.models.promoted",
        partitions=1,
    )
    prior_only = policy == "prior-only"
    fresh: dict[str, Any] = {} if cfg.half_life_hours is None else {"half_life_hours": cfg.half_life_hours}
    if prior_only:
        feed = FeedPolicy(prior_strength=PRIOR_ONLY_STRENGTH, explore_share=0.0, **fresh)
    else:
        feed = FeedPolicy(**fresh)
    state = out_dir / "policies" / policy.replace("+", "-") / "state"
    return base.model_copy(
        update={
            "state_dir": state,
            "dev_mode": True,  # the simulated songs are local files
            "encoder": "logmel",
            "kafka": base.kafka.model_copy(
                update={"topics": topics, "worker_group_id": f"w-{tag}", "feedback_group_id": f"f-{tag}"}
            ),
            "redis": RedisSettings(url=base.redis.url, key_prefix=tag, socket_timeout_s=base.redis.socket_timeout_s),
            "index": IndexSettings(path=state / "index"),
            "model": base.model.model_copy(update={"head_dir": None}),
            "feed": FeedSettings(feeds={DEFAULT_FEED: feed}),
            "api": ApiSettings(page_cache_ttl_s=0.0, calibration_ttl_s=0.0, max_limit=200),
            "retrain": RetrainSettings(
                min_plays=cfg.retrain_min_plays,
                epochs=cfg.retrain_epochs,
                patience=cfg.retrain_epochs,
                margin=cfg.retrain_margin,
                holdout_fraction=cfg.retrain_holdout_fraction,
                targets=cfg.retrain_targets,
                likes_model=cfg.retrain_likes_model,
                rate_prior_plays=cfg.retrain_rate_prior_plays,
            ),
            "feedback": base.feedback.model_copy(update={"log_dir": None}),
        }
    )


def _page(client: Any, limit: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    resp = client.get(f"/v1/feeds/{DEFAULT_FEED}", params=params)
    resp.raise_for_status()
    page: dict[str, Any] = resp.json()
    return page


def _candidates(client: Any, max_candidates: int) -> list[dict[str, Any]]:
    """The whole candidate set of the feed (random / newest re-order it), fetched page by page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(items) < max_candidates:
        page = _page(client, 200, cursor)
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor or not page["items"]:
            break
    return items


def _reorder(items: list[dict[str, Any]], policy: str, page_size: int, rng: np.random.Generator) -> list[str]:
    """A random page, or the newest songs first (ties broken at random)."""
    order = rng.permutation(len(items))
    shuffled = [items[int(k)] for k in order]
    if policy == "newest":
        shuffled.sort(key=lambda it: float(it["components"]["age_hours"]))
    return [it["song_id"] for it in shuffled[:page_size]]


def _pick(n: int, want: int, rng: np.random.Generator) -> list[int]:
    """Positions a user plays on a page of ``n``: position-biased (weight 1 / (1 + position))."""
    if n == 0:
        return []
    weights = 1.0 / (1.0 + np.arange(n))
    return [int(k) for k in rng.choice(n, size=min(want, n), replace=False, p=weights / weights.sum())]


def _engage(settings: Settings, events: list[Engagement]) -> None:
    if not events:
        return
    producer = make_producer(settings.kafka)
    try:
        topic = settings.kafka.topics.engagement
        futures = [producer.send(topic, key=e.song_id.encode(), value=e.to_bytes()) for e in events]
        flush_or_raise(producer, futures)
    finally:
        producer.close(timeout=10)


def _feed_size(settings: Settings) -> int:
    store = stores.score_store(settings)
    try:
        return store.feed_size(settings.feed.name)
    finally:
        store.close()


def _parallel(fns: Sequence[Callable[[], object]]) -> list[object]:
    with ThreadPoolExecutor(max_workers=max(1, len(fns))) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


# --------------------------------------------------------------------------- the loop


def run_loop_simulation(
    settings: Settings,
    *,
    songs: int,
    users: int,
    hours: int,
    seed: int,
    out_dir: Path,
    policies: Sequence[str] = POLICIES,
    config: LoopConfig | None = None,
) -> LoopResult:
    """Run the seeded loop under each policy on the services ``settings`` points at; see the module docstring."""
    from fastapi.testclient import TestClient

    from ranker.model.artifact import promote
    from ranker.serving.api import create_app

    cfg = config or LoopConfig()
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or songs < 1 or users < 1 or hours < 1:
        raise ValueError(f"policies must be among {POLICIES} (got {unknown}); songs, users, hours >= 1")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = settings.model_copy(update={"encoder": "logmel"})
    world = _build_world(songs=songs, users=users, hours=hours, seed=seed, out_dir=out_dir, cfg=cfg)
    started = time.monotonic()
    head = _pretrain_head(
        base.model_copy(update={"state_dir": out_dir / "pretrain"}), seed=seed, out_dir=out_dir, cfg=cfg
    )
    log.info("world and initial head ready in %.1fs", time.monotonic() - started)

    ns = {p: _policy_settings(base, p, out_dir, cfg) for p in policies}
    for s in ns.values():
        ensure_topics(s.kafka, all_topics(s.kafka))
        promote(s.head_dir.parent, head.save_versioned(s.head_dir.parent))
    outcomes = {p: PolicyOutcome() for p in policies}
    by_id = {s.song_id: s for s in world.songs}
    boost = [dict.fromkeys(STYLES, 0.0) | {st: cfg.style_boost} for st in world.user_styles]

    with ExitStack() as stack:
        # Exploration draws from one seeded generator per policy, the same seed for each (common random numbers).
        clients = {
            p: stack.enter_context(
                TestClient(create_app(s, explore_rng=np.random.default_rng(np.random.SeedSequence([seed, 300]))))
            )
            for p, s in ns.items()
        }
        published = 0
        for hour in range(hours):
            arriving = [s for s in world.songs if s.hour == hour]
            events = [
                SongGenerated(
                    song_id=s.song_id,
                    audio_uri=s.path.as_uri(),
                    generator=s.generator,
                    created_at=world.start + timedelta(hours=hour, seconds=k),
                    duration_s=cfg.duration_s,
                    tags=[s.style],
                )
                for k, s in enumerate(arriving)
            ]
            for s in ns.values():
                publish_events(s, events)
            published += len(events)
            # A worker that saw no message within idle_s exits; run again until every song is scored,
            # so that a slow first fetch on a busy machine cannot leave a policy with an empty feed.
            pending = list(ns.values())
            for _ in range(5):
                _parallel([lambda s=s: Worker(s).run(until_idle_s=cfg.idle_s) for s in pending])  # type: ignore[misc]
                pending = [s for s in pending if _feed_size(s) < published]
                if not pending:
                    break
            for p, s in ns.items():
                # The same users draw the same random numbers under every policy (common random numbers).
                rng = np.random.default_rng(np.random.SeedSequence([seed, 200, hour]))
                sent: list[Engagement] = []
                plays = likes = 0
                expected = 0.0
                now = datetime.now(UTC)
                reordered = p in ("random", "newest")
                pool = _candidates(clients[p], cfg.max_candidates) if reordered else []
                for u in range(len(world.user_styles)):
                    if reordered:
                        shown = _reorder(pool, p, cfg.page_size, rng)
                    else:
                        shown = [it["song_id"] for it in _page(clients[p], cfg.page_size, None)["items"]]
                    positions = _pick(len(shown), cfg.plays_per_user, rng)
                    draws = rng.random(cfg.plays_per_user)
                    for pos, draw in zip(positions, draws, strict=False):
                        sid = shown[pos]
                        song = by_id[sid]
                        p_like = 1.0 / (1.0 + math.exp(-(_logit(song.like_prob) + boost[u][song.style])))
                        kinds = ["play", "like" if draw < p_like else "skip"]
                        plays += 1
                        expected += p_like
                        likes += kinds[1] == "like"
                        for kind in kinds:
                            sent.append(
                                Engagement(
                                    event_id=f"h{hour}-u{u}-{sid}-{kind}",
                                    song_id=sid,
                                    user_id=f"user-{u}",
                                    type=kind,
                                    ts=now,
                                    feed=DEFAULT_FEED,
                                    position=pos,
                                )
                            )
                _engage(s, sent)
                outcomes[p].plays.append(plays)
                outcomes[p].likes.append(likes)
                outcomes[p].expected_likes.append(expected)
            _parallel([lambda s=s: FeedbackConsumer(s).run(until_idle_s=cfg.idle_s) for s in ns.values()])  # type: ignore[misc]
            retrain_p = "prior+evidence+retrain"
            if retrain_p in ns and (hour + 1) % cfg.retrain_every_h == 0 and hour + 1 < hours:
                try:
                    recipe = {"lr": cfg.retrain_lr, "batch_size": cfg.retrain_batch_size}
                    report = run_once(ns[retrain_p], train_overrides={k: v for k, v in recipe.items() if v is not None})
                    outcomes[retrain_p].retrains += 1
                    outcomes[retrain_p].promotions += int(report.promoted)
                    if report.promoted:
                        items = _candidates(clients[retrain_p], cfg.max_candidates)
                        outcomes[retrain_p].promoted_prior_spearman.append(_prior_spearman(items, world, cfg))
                        if outcomes[retrain_p].first_promotion_hour is None:
                            outcomes[retrain_p].first_promotion_hour = hour
                    log.info("retrain at hour %d: %s", hour, report.to_dict())
                except Exception as exc:  # too little data yet is not a failure of the simulation
                    log.warning("retrain at hour %d failed: %s", hour, exc)
            log.info("hour %d: %s", hour, {p: o.hourly_rates()[-1] for p, o in outcomes.items()})
        result = LoopResult(seed, songs, users, hours, outcomes)
        if "prior-only" in clients:
            result.prior_spearman = _prior_spearman(_candidates(clients["prior-only"], cfg.max_candidates), world, cfg)
        first = outcomes["prior+evidence+retrain"].first_promotion_hour if "prior+evidence+retrain" in ns else None
        if first is not None:
            late = {s.song_id for s in world.songs if s.hour > first}
            for p in ("prior-only", "prior+evidence", "prior+evidence+retrain"):
                if p in clients:
                    items = [it for it in _candidates(clients[p], cfg.max_candidates) if it["song_id"] in late]
                    outcomes[p].late_prior_spearman = _prior_spearman(items, world, cfg)

    result.json_path = out_dir / "loop-result.json"
    result.json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.png_path = plot_like_rates(result, out_dir / "loop-like-rate.png")
    return result


# --------------------------------------------------------------------------- reporting


def audience_like_rates(world: _World, cfg: LoopConfig) -> dict[str, float]:
    """Each song's like rate over the whole audience: its listeners' like probabilities, averaged.

    What the feed's like rate measures, and what a head retrained on this audience can learn (the
    style boost included, which the history's targets do not have).
    """
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


def _prior_spearman(items: list[dict[str, Any]], world: _World, cfg: LoopConfig) -> float | None:
    """How well a head's prior like rate orders these songs by the audience's like rate."""
    truth = audience_like_rates(world, cfg)
    pairs = [(float(it["components"]["prior_rate"]), truth[it["song_id"]]) for it in items if it["song_id"] in truth]
    if len(pairs) < 3:
        return None
    a, b = (np.argsort(np.argsort(np.array(col))).astype(np.float64) for col in zip(*pairs, strict=True))
    return float(np.corrcoef(a, b)[0, 1])


def print_result(result: LoopResult) -> None:
    """The like rate per simulated hour per policy, and overall, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"like rate per simulated hour (seed {result.seed}, {result.songs} songs, {result.users} users)"
    )
    table.add_column("policy")
    for h in range(result.hours):
        table.add_column(f"h{h}", justify="right")
    table.add_column("overall", justify="right", style="bold")
    table.add_column("plays", justify="right")
    for p, o in result.outcomes.items():
        table.add_row(p, *(f"{r:.3f}" for r in o.hourly_rates()), f"{o.like_rate:.3f}", str(sum(o.plays)))
    Console(width=max(100, 40 + 8 * result.hours)).print(table)


def plot_like_rates(result: LoopResult, path: Path) -> Path | None:
    """A PNG of the like rate per simulated hour per policy; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, o in result.outcomes.items():
        ax.plot(range(result.hours), o.hourly_rates(), marker="o", label=f"{p} ({o.like_rate:.3f})")
    ax.set_xlabel("simulated hour")
    ax.set_ylabel("like rate (likes / plays)")
    ax.set_title(f"apexrank loop simulation (synthetic; seed {result.seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


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


def cmd_simulate_loop(args: argparse.Namespace) -> int:
    """Start the embedded stack (idempotent), run the simulation, print the table."""
    from consumers.stack import EmbeddedStack

    try:
        config = loop_config(args.set)
    except ValueError as exc:
        print(f"apexrank simulate loop: {exc}", file=sys.stderr)
        return 2
    settings = Settings()
    EmbeddedStack(settings).up()
    result = run_loop_simulation(
        settings,
        songs=args.songs,
        users=args.users,
        hours=args.hours,
        seed=args.seed,
        out_dir=Path(args.out),
        config=config,
    )
    print_result(result)
    print(f"results: {result.json_path}  plot: {result.png_path}")
    return 0
