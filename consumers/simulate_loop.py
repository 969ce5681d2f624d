"""``apexrank simulate loop``: the seeded feedback-loop simulation of the feed policies.

Everything runs on the real services: synthetic songs arrive each simulated hour on
``songs.generated`` (the real :class:`~consumers.worker.Worker` scores them), synthetic
users browse feeds through the HTTP API (FastAPI ``TestClient`` over
:func:`ranker.serving.api.create_app`) and send plays, likes and skips over Kafka to the engagement
topic (the real :class:`~consumers.feedback.FeedbackConsumer` counts them). The same world
(songs, users, their tastes, their random draws) is replayed under each policy, each in its
own namespace (topics, consumer groups, Redis key prefix, index and state directories).
docs/loop-simulation.md describes the design and its results. All of it is SYNTHETIC.

This module runs the loop and is the CLI's entry point; the world and the simulation's knobs are
:mod:`consumers.loop_world`, the outcomes, table and plot :mod:`consumers.loop_report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from consumers.feedback import FeedbackConsumer
from consumers.kafka_io import all_topics, ensure_topics, flush_or_raise, make_producer
from consumers.loop_offpolicy import off_policy_check
from consumers.loop_report import (
    LoopResult,
    PolicyOutcome,
    _posterior_spearman,
    _prior_spearman,
    plot_like_rates,
    print_result,
)
from consumers.loop_world import NOVEL, LoopConfig, _build_world, _pretrain_head, loop_config
from consumers.publish import publish_events
from consumers.retrain import refresh_examination_weights, run_once
from consumers.worker import Worker
from ranker import stores
from ranker.events import Engagement, SongGenerated
from ranker.settings import (
    DEFAULT_FEED,
    ApiSettings,
    FeedPolicy,
    FeedSettings,
    IndexSettings,
    LikeRatePrior,
    RedisSettings,
    RetrainSettings,
    Settings,
    TopicSettings,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The policies compared, in the order the acceptance criterion ranks them (worst first).
POLICIES: tuple[str, ...] = ("random", "newest", "prior-only", "prior+evidence", "prior+evidence+retrain")
#: Issue 16's policies, run when asked for: prior + evidence with every play counted 1 wherever it was shown
#: (``prior+evidence`` is position-aware, the product's default); the same feed personal (``?user=``); the
#: personal page without its taste term (``feed.taste_weight = 0``: the listener's heard songs left out, no
#: blend), which tells the two halves of a personal page apart; and retraining behind the off-policy gate.
EXTRA_POLICIES: tuple[str, ...] = ("plain-evidence", "personal", "heard-excluded", "retrain+gate")
#: Issue 17's, for the new-generator scenario (LoopConfig.novel_from_h): prior + evidence with every song at the
#: feed's own w (no spread or OOD lowering it; ``prior+evidence`` is uncertainty-aware, the product's default),
#: and the default with the generators' calibration factors refitted after every hour by a retrain that never
#: promotes (its margin is out of reach), so that calibration alone is added.
EXTRA_POLICIES += ("fixed-w", "calibrated")
#: Policies whose pages come from the API as served (not re-ordered by the simulation).
_SERVED = (
    "prior-only",
    "prior+evidence",
    "prior+evidence+retrain",
    "plain-evidence",
    "personal",
    "heard-excluded",
    "retrain+gate",
    "fixed-w",
    "calibrated",
)
#: Policies whose pages are asked for as the listener's (``?user=``).
_PERSONAL = ("personal", "heard-excluded")
#: Retrained after every hour but the last: on the Spearman gate alone, and with the off-policy gate too.
_RETRAINED = ("prior+evidence+retrain", "retrain+gate", "calibrated")
#: Position-aware policies that no retrain job refreshes: their examination weights are re-estimated each hour.
_POSITION_AWARE = ("prior+evidence", "personal", "heard-excluded", "fixed-w")
#: A gate margin no candidate reaches: the "calibrated" policy's retrains refit the calibration and promote nothing.
NEVER_PROMOTE = 1e9
#: A prior strength so large that no amount of plays moves the posterior off the prior.
PRIOR_ONLY_STRENGTH = 1e12


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
        feeds_served=f"{tag}.feeds.served",
        partitions=1,
    )
    prior_only = policy == "prior-only"
    fresh: dict[str, Any] = {} if cfg.half_life_hours is None else {"half_life_hours": cfg.half_life_hours}
    if prior_only:
        feed = FeedPolicy(prior_strength=PRIOR_ONLY_STRENGTH, explore_share=0.0, **fresh)
    elif policy == "plain-evidence":
        feed = FeedPolicy(evidence="plain", **fresh)
    elif policy == "fixed-w":
        feed = FeedPolicy(uncertain_prior=False, ood_prior_factor=1.0, **fresh)
    else:
        feed = FeedPolicy(**fresh)
    state = out_dir / "policies" / policy.replace("+", "-") / "state"
    return base.model_copy(
        update={
            "state_dir": state,
            "dev_mode": True,  # the simulated songs are local files
            "encoder": "logmel",
            # One song per worker batch: a float32 product's last bit depends on the batch it is in,
            # and which songs share a poll depends on timing; such a bit can flip a near tie in a
            # feed's order and so everything after it.
            # The pipelined worker's groups (worker.group_songs) are one song each for the same reason.
            "worker": base.worker.model_copy(update={"max_poll_records": 1, "group_songs": 1}),
            "kafka": base.kafka.model_copy(
                update={"topics": topics, "worker_group_id": f"w-{tag}", "feedback_group_id": f"f-{tag}"}
            ),
            "redis": RedisSettings(url=base.redis.url, key_prefix=tag, socket_timeout_s=base.redis.socket_timeout_s),
            "index": IndexSettings(path=state / "index"),
            "model": base.model.model_copy(update={"head_dir": None}),
            "feed": FeedSettings(
                feeds={DEFAULT_FEED: feed},
                like_rate=LikeRatePrior(generator_calibration=policy == "calibrated"),
                **_taste(cfg, policy),
            ),
            "api": ApiSettings(page_cache_ttl_s=0.0, calibration_ttl_s=0.0, max_limit=200),
            "retrain": RetrainSettings(
                min_plays=cfg.retrain_min_plays,
                epochs=cfg.retrain_epochs,
                patience=cfg.retrain_epochs,
                margin=NEVER_PROMOTE if policy == "calibrated" else cfg.retrain_margin,
                holdout_fraction=cfg.retrain_holdout_fraction,
                targets=cfg.retrain_targets,
                likes_model=cfg.retrain_likes_model,
                rate_prior_plays=cfg.retrain_rate_prior_plays,
                # The documented retrain policy judges on Spearman alone; "retrain+gate" adds the off-policy gate.
                off_policy_gate=policy == "retrain+gate",
                rescore_grace_s=0.0,  # its workers run between the hours, never beside a promotion
            ),
            "feedback": base.feedback.model_copy(update={"log_dir": None}),
        }
    )


def _taste(cfg: LoopConfig, policy: str) -> dict[str, float]:
    """The personal blend's settings: none for heard-excluded, the LoopConfig's overrides, else the product's."""
    if policy == "heard-excluded":
        return {"taste_weight": 0.0}
    pairs = (("taste_weight", cfg.taste_weight), ("taste_evidence_half", cfg.taste_evidence_half))
    return {name: value for name, value in pairs if value is not None}


def _page(client: Any, limit: int, cursor: str | None, user: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    if user:
        params["user"] = user
    resp = client.get(f"/v1/feeds/{DEFAULT_FEED}", params=params)
    resp.raise_for_status()
    page: dict[str, Any] = resp.json()
    return page


def _caught_up(client: Any) -> None:
    """Wait until the API's song table has applied every store write so far: each hour's pages are
    then a function of the store, not of how quickly the table followed the change log."""
    if not client.portal.call(client.app.state.reader.sync.caught_up, 60.0):
        raise RuntimeError("the API's song table did not catch up with the store within 60 s")


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


def _parallel(fns: Sequence[Callable[[], T]]) -> list[T]:
    with ThreadPoolExecutor(max_workers=max(1, len(fns))) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def _retrain(s: Settings, client: Any, outcome: PolicyOutcome, hour: int, world: Any, cfg: LoopConfig) -> None:
    """One retrain of a retrained policy after ``hour``; a promotion's prior Spearman is recorded."""
    try:
        recipe = {"lr": cfg.retrain_lr, "batch_size": cfg.retrain_batch_size}
        report = run_once(s, train_overrides={k: v for k, v in recipe.items() if v is not None})
    except Exception as exc:  # too little data yet is not a failure of the simulation
        log.warning("retrain at hour %d failed: %s", hour, exc)
        return
    outcome.retrains += 1
    outcome.promotions += int(report.promoted)
    if report.promoted:
        outcome.promotion_hours.append(hour)
        items = _candidates(client, cfg.max_candidates)
        outcome.promoted_prior_spearman.append(_prior_spearman(items, world, cfg))
        if outcome.first_promotion_hour is None:
            outcome.first_promotion_hour = hour
    log.info("retrain at hour %d: %s", hour, report.to_dict())


def _count_engagement(ns: dict[str, Settings], unread: dict[str, int], idle_s: float, hour: int) -> None:
    """Run each policy's feedback consumer until it has read every event sent this hour.

    A consumer exits after ``idle_s`` without a message; on a busy machine its first fetch can come
    later than that. Evidence counted an hour late would change what every later hour serves (and
    what retraining learns from), so a run is repeated until nothing sent is left unread.
    """
    pending = {p: n for p, n in unread.items() if n}
    for _ in range(5):
        names = list(pending)
        stats = _parallel([lambda s=ns[p]: FeedbackConsumer(s).run(until_idle_s=idle_s) for p in names])  # type: ignore[misc]
        left = {p: pending[p] - st.messages for p, st in zip(names, stats, strict=True)}
        pending = {p: n for p, n in left.items() if n > 0}
        if not pending:
            return
        log.info("hour %d: feedback consumers idled out with events unread %s; running them again", hour, pending)
    raise RuntimeError(f"hour {hour}: feedback consumers left events unread {pending}")


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

    from ranker.model.registry import promote
    from ranker.serving.api import create_app

    cfg = config or LoopConfig()
    unknown = sorted(set(policies) - set(POLICIES + EXTRA_POLICIES))
    if unknown or songs < 1 or users < 1 or hours < 1:
        known = POLICIES + EXTRA_POLICIES
        raise ValueError(f"policies must be among {known} (got {unknown}); songs, users, hours >= 1")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = settings.model_copy(update={"encoder": "logmel"})
    world = _build_world(songs=songs, users=users, hours=hours, seed=seed, out_dir=out_dir, cfg=cfg, settings=base)
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
    index_of = {s.song_id: i for i, s in enumerate(world.songs)}
    users_of: dict[str, dict[str, int]] = {p: {} for p in policies}  # request_id -> listener, per policy

    # The API scores pages at simulated time (the end of the hour being browsed), never the wall
    # clock: how long an hour took to run on a busy machine must not change what a page shows.
    sim_now = [world.start.timestamp()]
    with ExitStack() as stack:
        # Exploration draws from one seeded generator per policy, the same seed for each (common random numbers).
        clients = {
            p: stack.enter_context(
                TestClient(
                    create_app(
                        s,
                        explore_rng=np.random.default_rng(np.random.SeedSequence([seed, 300])),
                        clock=lambda: sim_now[0],
                    )
                )
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
            if pending:
                raise RuntimeError(f"hour {hour}: {len(pending)} policies' workers did not score every song")
            for client in clients.values():
                _caught_up(client)
            sim_now[0] = (world.start + timedelta(hours=hour + 1)).timestamp()
            unread: dict[str, int] = {}
            for p, s in ns.items():
                # The same users draw the same random numbers under every policy (common random numbers).
                rng = np.random.default_rng(np.random.SeedSequence([seed, 200, hour]))
                sent: list[Engagement] = []
                plays = likes = 0
                expected = 0.0
                now = datetime.fromtimestamp(sim_now[0], UTC)
                reordered = p in ("random", "newest")
                pool = _candidates(clients[p], cfg.max_candidates) if reordered else []
                for u in range(len(world.user_styles)):
                    request_id: str | None = None
                    if reordered:
                        shown = _reorder(pool, p, cfg.page_size, rng)
                    else:
                        page = _page(clients[p], cfg.page_size, None, f"user-{u}" if p in _PERSONAL else None)
                        shown, request_id = [it["song_id"] for it in page["items"]], page.get("request_id")
                        if request_id:
                            users_of[p][request_id] = u
                    positions = _pick(len(shown), cfg.plays_per_user, rng)
                    draws = rng.random(cfg.plays_per_user)
                    for pos, draw in zip(positions, draws, strict=False):
                        sid = shown[pos]
                        p_like = world.like_probability(u, index_of[sid], cfg, pos)
                        kinds = ["play", "like" if draw < p_like else "skip"]
                        plays += 1
                        expected += p_like
                        likes += kinds[1] == "like"
                        if world.songs[index_of[sid]].generator == NOVEL:
                            outcomes[p].novel_plays += 1
                            outcomes[p].novel_expected_likes += p_like
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
                                    request_id=request_id,
                                )
                            )
                _engage(s, sent)
                unread[p] = len(sent)
                outcomes[p].plays.append(plays)
                outcomes[p].likes.append(likes)
                outcomes[p].expected_likes.append(expected)
            _count_engagement(ns, unread, cfg.idle_s, hour)
            for p in _POSITION_AWARE:  # the retrain job re-estimates them itself
                if p in ns:
                    refresh_examination_weights(ns[p])
            for retrain_p in _RETRAINED:
                if retrain_p in ns and (hour + 1) % cfg.retrain_every_h == 0 and hour + 1 < hours:
                    _retrain(ns[retrain_p], clients[retrain_p], outcomes[retrain_p], hour, world, cfg)
            log.info("hour %d: %s", hour, {p: o.hourly_rates()[-1] for p, o in outcomes.items()})
        result = LoopResult(seed, songs, users, hours, outcomes)
        if "prior-only" in clients:
            result.prior_spearman = _prior_spearman(_candidates(clients["prior-only"], cfg.max_candidates), world, cfg)
        novel = {s.song_id for s in world.songs if s.generator == NOVEL}
        for p in _SERVED:
            if p in clients and p != "prior-only":  # the posterior against the truth, over every song
                items = _candidates(clients[p], cfg.max_candidates)
                outcomes[p].posterior_spearman = _posterior_spearman(items, world, cfg)
                outcomes[p].songs_with_spread = sum(it["components"].get("prior_sd") is not None for it in items)
                if novel:  # and over the new generator's songs alone
                    mine = [it for it in items if it["song_id"] in novel]
                    outcomes[p].novel_posterior_spearman = _posterior_spearman(mine, world, cfg)
        for p in ("prior+evidence", "plain-evidence"):
            if p in ns:  # off-policy evaluation of the prior order on this run's exploration slots, against truth
                outcomes[p].off_policy = off_policy_check(ns[p], world, cfg, users_of[p], seed)
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


# --------------------------------------------------------------------------- CLI


def cmd_simulate_loop(args: argparse.Namespace) -> int:
    """Start the embedded stack (idempotent), run the simulation, print the table."""
    from consumers.stack import EmbeddedStack

    try:
        config = loop_config(args.set)
    except ValueError as exc:
        print(f"apexrank simulate loop: {exc}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES + EXTRA_POLICIES))
    if unknown or not policies:
        print(
            f"apexrank simulate loop: --policies: unknown {unknown}; known: {POLICIES + EXTRA_POLICIES}",
            file=sys.stderr,
        )
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
        policies=policies,
        config=config,
    )
    print_result(result)
    print(f"results: {result.json_path}  plot: {result.png_path}")
    return 0
