"""``apexrank retrain``: the periodic job around :mod:`ranker.model.retrain`.

It gathers the training set (engagement log + the workers' embedding stores, one per
index shard + song metadata from Redis), runs the train/compare/promote step, and after a
promotion rescores the songs still inside the cold-start window from their
stored embeddings (Redis and every feed), then publishes ``models.promoted``. A worker loads
the new head only at its next look (``worker.model_check_s``, between batches), so the window's
songs it scored with the old one meanwhile are rescored again after ``retrain.rescore_grace_s``,
and every run starts by rescoring those the serving model did not score (a sweep). Every run
first re-estimates the page positions' examination weights from the last
``examination.window_days`` of the served and engagement logs and stores them for the
feedback consumers (:func:`refresh_examination_weights`; docs/ranking.md).
Run once (cron, a Kubernetes CronJob) or with ``--every`` as a scheduler. Each run,
failed or not, pushes its figures to a Pushgateway when ``retrain.pushgateway_url`` is
set (:mod:`consumers.retrain_metrics`): a CronJob lives too briefly to be scraped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.progress import Progress

from consumers import retrain_metrics
from consumers.evaluate_policy import load_impressions
from consumers.kafka_io import Publisher, ensure_topics
from consumers.retrain_gate import off_policy_judge
from consumers.shard_embeddings import STORE_FILE, ShardEmbeddings
from indexes.base import ScoreStore, SongRecord
from indexes.engagement_log import EngagementLog
from indexes.redis_schema import CREATED_AT, GENERATOR, MODEL_VERSION
from ranker import stores
from ranker.encoders import encoder_spec
from ranker.errors import ConfigError
from ranker.features import FeatureSet
from ranker.model.artifact import ScoringModel
from ranker.model.examination import Examination, refresh_examination
from ranker.model.registry import clear_pending, models_root_of, pending, prune_versions, resolve_model_dir
from ranker.model.retrain import Observed, RetrainReport, aggregate_engagement, promotion_owed, retrain
from ranker.model.train_config import TrainConfig
from ranker.scoring import SongMeta, load_current_model, score_songs
from ranker.serving.policy import Policy, generator_factors
from ranker.serving.state import READ_FIELDS, state_from_fields
from ranker.serving.writer import FeedWriter, write_scored
from ranker.settings import Settings

log = logging.getLogger(__name__)


def current_model(settings: Settings) -> ScoringModel:
    """The promoted head (or the seeded one) for the configured encoder, whose weights are never loaded."""
    return load_current_model(settings, encoder_spec(settings))


def gather(settings: Settings, store: ScoreStore) -> tuple[Observed, FeatureSet]:
    """Played songs that have embeddings (in any shard) and metadata (with ``likes_model=head``, only those
    past the threshold).

    Songs taken down (a tombstone in the score store) are left out, whatever the engagement log
    still holds of them, and so are songs neither an embedding store nor an archive has. Songs
    past the retention window come from the archive.
    """
    log_table = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read()
    ids, plays, likes = aggregate_engagement(log_table)
    # Every played song: the likes read-out learns from songs below the exposure threshold too.
    keep = plays >= (1 if settings.retrain.likes_model == "readout" else settings.retrain.min_plays)
    gone = store.deleted(ids)
    if gone:
        log.info("leaving out %d songs taken down", len(gone))
        keep &= np.array([s not in gone for s in ids], dtype=bool)
    ids = [s for s, k in zip(ids, keep, strict=True) if k]
    plays, likes = plays[keep], likes[keep]
    meta = _metadata(store, ids)
    with ShardEmbeddings(settings) as emb:
        meta.update(emb.archived_metadata([s for s in ids if s not in meta]))
        stored = emb.get_many(ids)
        log.info("%d of %d played songs found in %d embedding stores", len(stored), len(ids), len(emb.paths))
    rows = [i for i, s in enumerate(ids) if s in stored and s in meta]
    song_ids = [ids[i] for i in rows]
    records = [stored[s].record for s in song_ids]
    encoder_ids = {r.encoder_id for r in records}
    if len(encoder_ids) > 1:
        raise ConfigError(f"the embedding store mixes encoders {sorted(encoder_ids)}; retrain per encoder")
    observed = Observed(
        song_ids=song_ids,
        plays=plays[rows],
        likes=likes[rows],
        generators=[meta[s][0] for s in song_ids],
        created_at=[meta[s][1] for s in song_ids],
    )
    layers = np.stack([r.layers for r in records]).astype(np.float32) if records else np.zeros((0, 4, 1), np.float32)
    features = FeatureSet(
        song_ids=song_ids,
        layers=layers,
        n_segments=np.array([r.n_segments for r in records], dtype=np.int64),
        encoder_id=records[0].encoder_id if records else "",
    )
    return observed, features


def _metadata(store: ScoreStore, song_ids: list[str]) -> dict[str, tuple[str, datetime]]:
    """Each song's generator and creation time (the targets' cohorts and the rescore window), one round trip."""
    out: dict[str, tuple[str, datetime]] = {}
    for s, rec in zip(song_ids, store.read_songs(song_ids, fields=[GENERATOR, CREATED_AT]), strict=True):
        if rec is not None and rec.generator and rec.created_at:
            out[s] = (rec.generator, datetime.fromisoformat(rec.created_at))
    return out


def refresh_examination_weights(
    settings: Settings, now: datetime | None = None, impressions: pa.Table | None = None
) -> Examination:
    """Re-estimate the examination weights from the recent served log joined with engagement; store them.

    Reads only the day folders of the last ``examination.window_days`` (the impressions are then cut to
    the window exactly), unless given ``impressions`` read already; the feedback consumers count with the
    new weights within ``examination.refresh_s``.
    """
    now = now or datetime.now(UTC)
    since = now - timedelta(days=settings.examination.window_days)
    table = load_impressions(settings, since, now) if impressions is None else impressions
    counters = stores.engagement_counters(settings)
    try:
        exam = refresh_examination(table, counters, settings.examination, now)
    finally:
        counters.close()
    log.info(
        "examination weights %s from %d explored impressions (%d plays)%s",
        [round(w, 3) for w in exam.weights[:10]],
        exam.explored_impressions,
        exam.explored_plays,
        "" if exam.estimated else f": fewer than {settings.examination.min_impressions}, all 1",
    )
    return exam


def refresh_generator_calibration(settings: Settings, store: ScoreStore, observed: Observed) -> dict[str, Any]:
    """Fit each generator's factor on the calibration scale from the played songs and the priors they are
    served at (their hashes', after any rescore), store it, and rebuild the feeds when a factor moved by
    more than ``retrain.generator_calibration_tolerance`` (relative), so every entry uses the new ones."""
    cfg = settings.feed.like_rate
    policy = Policy(settings.feed.name, settings.feed.default, cfg)  # no factors: the uncalibrated prior
    values = store.read_fields(observed.song_ids, READ_FIELDS)
    rows = [(i, st) for i, v in enumerate(values) if (st := state_from_fields(observed.song_ids[i], v)) is not None]
    at = np.array([i for i, _ in rows], dtype=np.intp)
    p0 = np.array([policy.prior_rate(st, 1.0) for _, st in rows], dtype=np.float64)
    fitted = generator_factors([st.generator for _, st in rows], observed.plays[at], observed.likes[at], p0, cfg)
    old = store.generator_calibration()
    tolerance = settings.retrain.generator_calibration_tolerance
    moved = max(
        (abs(math.log(fitted.get(g, 1.0) / old.get(g, 1.0))) for g in set(fitted) | set(old)), default=0.0
    ) > math.log1p(tolerance)
    if moved:
        store.set_generator_calibration(fitted)
        FeedWriter(settings, store).rebuild()
    log.info(
        "generator calibration over %d songs: %s%s", len(rows), fitted, " (stored, feeds rebuilt)" if moved else ""
    )
    return {"factors": fitted, "songs": len(rows), "stored": moved}


def rescore_window(settings: Settings, model: ScoringModel, store: ScoreStore, *, stragglers: bool = False) -> int:
    """Rescore every feed member created inside the cold-start window with ``model``; with ``stragglers``,
    only those another model scored (a worker that had not loaded ``model`` yet, a promotion by hand)."""
    members: set[str] = set()
    for feed in settings.feed.feeds:
        members.update(s for s, _ in store.feed_page(feed, 0, 10_000_000))
    meta = _metadata(store, sorted(members))
    horizon = datetime.now(UTC) - timedelta(hours=settings.retrain.cold_start_window_h)
    window = sorted(s for s, (_, created) in meta.items() if created >= horizon)
    if stragglers and window:
        scored = store.read_songs(window, fields=[MODEL_VERSION])
        window = [s for s, r in zip(window, scored, strict=True) if r is not None and r.model_version != model.version]
    if not window:
        return 0
    now = datetime.now(UTC).isoformat()
    rescored: list[list[SongRecord]] = []
    with ShardEmbeddings(settings) as emb, Progress(transient=True) as bar:
        task = bar.add_task("rescoring the cold-start window", total=len(window))
        for start in range(0, len(window), 1024):
            chunk = window[start : start + 1024]
            stored = emb.get_many(chunk)
            ids = [s for s in chunk if s in stored]
            if not ids:
                continue
            layers = np.stack([stored[s].record.layers for s in ids]).astype(np.float32)
            songs = [SongMeta(s, meta[s][0], meta[s][1].isoformat()) for s in ids]
            rescored.append([score.record(now) for score in score_songs(settings, model, layers, songs)])
            bar.advance(task, len(chunk))
    # Calibration first, for every rescored song, so that no entry is written with a scale
    # that still measures the previous model (see FeedWriter.recalibrate).
    writer = FeedWriter(settings, store)
    for records in rescored:
        writer.recalibrate(records)
    for records in rescored:
        write_scored(store, settings, records)
    # Once more: the feedback consumer may have re-claimed a song at its old prior (still in
    # its hash) between the two passes. Idempotent; only such songs change the totals.
    for records in rescored:
        writer.recalibrate(records)
    return sum(len(r) for r in rescored)


def run_once(
    settings: Settings,
    publisher: Publisher | None = None,
    train_overrides: dict[str, object] | None = None,
    progress: bool = False,
) -> RetrainReport:
    """One retrain; ``train_overrides`` adjusts the candidate's TrainConfig (ablations, tests).

    ``progress`` shows a bar per training epoch (the long step; rescoring always has one).
    Its figures are pushed at the end, whether it failed or not (a failed push is only logged).
    """
    try:
        report = _run(settings, publisher, train_overrides, progress)
    except BaseException:
        retrain_metrics.push(settings, None)
        raise
    retrain_metrics.push(settings, report)
    return report


def _run(
    settings: Settings,
    publisher: Publisher | None,
    train_overrides: dict[str, object] | None,
    progress: bool,
) -> RetrainReport:
    store = stores.score_store(settings)
    began = time.perf_counter()
    try:
        r = settings.retrain
        now = datetime.now(UTC)
        # One read of the served and engagement logs, over the longer of the two windows that use it.
        days = max(settings.examination.window_days, r.off_policy_window_days if r.off_policy_gate else 0.0)
        shown = load_impressions(settings, now - timedelta(days=days), now)
        examination = refresh_examination_weights(settings, now, shown)
        root = models_root_of(settings.head_dir)
        # Read before the load: a promotion in between makes the candidate's promotion refuse, never pass.
        serving = resolve_model_dir(root)
        current = current_model(settings)
        rescored: dict[str, int] = {}
        owed = pending(root)
        if owed is not None:  # an earlier run moved ``current`` but did not finish: finish it first
            if owed.get("model_version") == current.version:
                log.warning("finishing the promotion of %s: rescore and announce", current.version)
                rescored["owed"] = _follow_up(settings, store, current, owed, publisher)
            else:  # ``current`` never moved to it (cut short before), or moved on since
                log.warning("dropping the owed follow-up of %s: %s serves", owed.get("model_version"), current.version)
            clear_pending(root)
        rescored["stragglers"] = n = rescore_window(settings, current, store, stragglers=True)
        if n:
            log.warning("rescored %d songs of the cold-start window another model scored with %s", n, current.version)
        observed, features = gather(settings, store)
        judge = off_policy_judge(settings, lambda ids: _metadata(store, ids), now, shown) if r.off_policy_gate else None
        gathered = time.perf_counter()
        config = TrainConfig.model_validate(
            {
                "epochs": r.epochs,
                "patience": r.patience,
                "lr": r.lr,
                "batch_size": r.batch_size,
                "seed": settings.model.seed,
                **(train_overrides or {}),
            }
        )
        report = retrain(
            current,
            features,
            observed,
            models_root=root,
            holdout_fraction=r.holdout_fraction,
            margin=r.margin,
            warm_start=r.warm_start,
            train_config=config,
            targets=r.targets,
            rate_prior_plays=r.rate_prior_plays,
            likes_model=r.likes_model,
            min_songs_head=r.min_songs_head,
            min_plays=r.min_plays,
            progress=progress,
            judge=judge,
            serving=serving,
        )
        report.timings_s = {"gather": round(gathered - began, 3), **report.timings_s}
        report.examination = examination.to_dict()
        report.rescored = rescored
        if report.promoted:
            grace_until = time.monotonic() + rescore_grace_s(settings)
            promoted = ScoringModel.load(report.model_dir)  # type: ignore[arg-type]
            rescoring = time.perf_counter()
            rescored["window"] = _follow_up(settings, store, promoted, promotion_owed(report), publisher)
            clear_pending(root)
            report.timings_s["rescore"] = round(time.perf_counter() - rescoring, 3)
            if rescore_grace_s(settings) > 0:
                # The songs workers scored with the old head before they loaded the new one.
                time.sleep(max(0.0, grace_until - time.monotonic()))
                waited = time.perf_counter()
                now_serving = resolve_model_dir(root)
                if now_serving is not None and now_serving.resolve() == Path(str(report.model_dir)).resolve():
                    rescored["grace"] = n = rescore_window(settings, promoted, store, stragglers=True)
                    log.info("rescored %d songs the previous head scored after the promotion", n)
                else:  # an operator moved current meanwhile: their model's songs are not stragglers
                    log.warning("current moved to %s after the promotion: no second rescore pass", now_serving)
                report.timings_s["rescore_grace"] = round(time.perf_counter() - waited, 3)
        if settings.feed.like_rate.generator_calibration:
            calibrating = time.perf_counter()
            report.generator_calibration = refresh_generator_calibration(settings, store, observed)
            report.timings_s["calibrate"] = round(time.perf_counter() - calibrating, 3)
        removed = prune_versions(root, r.keep_models)
        if removed:
            log.info("removed %d old model versions and leftovers: %s", len(removed), ", ".join(removed))
        report.timings_s["total"] = round(time.perf_counter() - began, 3)
        return report
    finally:
        store.close()


def rescore_grace_s(settings: Settings) -> float:
    """How long after a promotion the window's songs still scored by the old head are rescored again:
    ``retrain.rescore_grace_s``, by default two of the workers' looks for a new head and a margin."""
    grace = settings.retrain.rescore_grace_s
    return 2 * settings.worker.model_check_s + 5.0 if grace is None else grace


def _follow_up(
    settings: Settings,
    store: ScoreStore,
    promoted: ScoringModel,
    owed: dict[str, Any],
    publisher: Publisher | None,
) -> int:
    """What a promotion owes after ``current`` moved: the cold-start window rescored with the promoted
    model, then ``models.promoted``. Both repeat safely (a rescore is an upsert; the topic is keyed by
    version and compacted), so a run cut short does them again from the start. Returns the songs rescored."""
    n = rescore_window(settings, promoted, store)
    log.info("rescored %d songs inside the cold-start window with %s", n, promoted.version)
    event = {"schema_version": 1, **owed, "rescored": n, "promoted_at": datetime.now(UTC).isoformat()}
    topic = settings.kafka.topics.models_promoted
    if settings.kafka.auto_create_topics:  # else deploy/topics.sh made it, compacted
        ensure_topics(settings.kafka, [topic])
    pub = publisher or Publisher(settings.kafka)
    try:
        refused = pub.publish([(topic, promoted.version.encode(), json.dumps(event).encode())])
        if refused:  # a small event Kafka refuses is a broker setting to fix, not something to drop
            raise refused[0].error
    finally:
        if publisher is None:
            pub.close()
    return n


def run_every(settings: Settings, every_s: float, stop: threading.Event, progress: bool = False) -> None:
    """Retrain on a schedule until ``stop`` is set; a failed run is logged and retried next time."""
    if not (math.isfinite(every_s) and every_s > 0):  # a zero wait would rerun a failing job back to back
        raise ConfigError(f"retrain interval {every_s!r}s: give a positive duration")
    while not stop.is_set():
        started = time.monotonic()
        try:
            report = run_once(settings, progress=progress)
            print(json.dumps(report.to_dict(), default=str))
        except Exception:
            log.exception("retrain run failed; next attempt in %.0fs", every_s)
        stop.wait(max(0.0, every_s - (time.monotonic() - started)))


__all__ = ["STORE_FILE", "ShardEmbeddings", "gather", "rescore_window", "run_every", "run_once"]
