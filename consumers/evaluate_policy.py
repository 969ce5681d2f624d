"""``apexrank evaluate-policy``: a feed policy's off-policy like rate on the explored slots since T.

Reads the served log and the engagement log (or an impressions table already joined), scores
every pool song with the named feed policy on its prior only, and hands both to
:func:`ranker.model.offpolicy.evaluate_slots` (``--against``: two policies to
:func:`~ranker.model.offpolicy.compare_slots`). The prior only, because a song's plays and likes
in the store include the very likes being evaluated (docs/off-policy.md, "Leakage").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from consumers.durations import parse_since
from indexes.base import ScoreStore
from ranker.errors import ConfigError
from ranker.model.offpolicy import (
    MIN_MATCHED,
    RESAMPLES,
    ExploredSlots,
    OffPolicyComparison,
    OffPolicyEstimate,
    compare_slots,
    evaluate_slots,
)
from ranker.serving import batch as columns
from ranker.serving.policy import Policy, calibration_scale
from ranker.serving.state import WRITE_FIELDS
from ranker.settings import Settings

#: Songs read from the score store per round trip.
_READ_BATCH = 1000


def feed_policy(settings: Settings, name: str) -> Policy:
    """The named feed policy, compiled as the API compiles it."""
    config = settings.feed.feeds.get(name)
    if config is None:
        raise ConfigError(f"--policy {name!r}: no such feed (configured: {', '.join(sorted(settings.feed.feeds))})")
    return Policy(name, config, settings.feed.like_rate)


def prior_scores(store: ScoreStore, policy: Policy, song_ids: Sequence[str], now: float) -> dict[str, float]:
    """Each song's place in ``policy``'s order if it had no plays: its stored score with the posterior
    like rate replaced by the prior, calibrated as the feed calibrates it (the global scale times the
    song's generator factor where ``feed.like_rate.generator_calibration`` is on, both read from the store).

    A song the policy would not show (not in the store, unscored, refused by the feed's filters)
    gets no score.
    """
    factors = store.generator_calibration() if policy.like_rate.generator_calibration else {}
    policy = Policy(policy.name, policy.config, policy.like_rate, factors)
    scale = calibration_scale(*store.calibration_totals(), policy.like_rate)
    out: dict[str, float] = {}
    for start in range(0, len(song_ids), _READ_BATCH):
        ids = list(song_ids[start : start + _READ_BATCH])
        batch = columns.SongBatch.from_fields(ids, store.read_fields(ids, WRITE_FIELDS), now=now)
        with np.errstate(all="ignore"):
            p0 = columns.prior_rate(policy, batch, columns.row_scale(policy, batch, scale))
            quality, _ = columns.parts(policy, batch, p0)  # the quality at the posterior = the prior
        keep = batch.scored & columns.admits(policy, batch)
        for i in np.flatnonzero(keep).tolist():
            score = policy.stored_score(float(quality[i]), float(batch.created_ts[i]))
            if math.isfinite(score):
                out[ids[i]] = score
    return out


def pool_songs(impressions: pa.Table) -> list[str]:
    """Every song in an explored slot's pool."""
    explored = impressions.filter(pc.fill_null(impressions.column("explored"), False))
    songs = pc.unique(pc.list_flatten(explored.column("pool")))
    return sorted(s for s in songs.to_pylist() if s is not None)


def _days(since: datetime, now: datetime) -> list[str]:
    """The day folders that can hold records from ``since`` to ``now``: a file lives in its latest
    record's day (up to the clock skew past ``now``, so the day after too); files written before
    that rule lived in their earliest record's, so the day before ``since`` too."""
    day = since.date() - timedelta(days=1)
    out = []
    while day <= now.date() + timedelta(days=1):
        out.append(day.isoformat())
        day += timedelta(days=1)
    return out


def load_impressions(settings: Settings, since: datetime, now: datetime, path: Path | None = None) -> pa.Table:
    """The impressions served at or after ``since``: from ``path`` (an impressions table as Parquet),
    else the served log joined with the engagement log."""
    import pyarrow.parquet as pq

    if path is not None:
        if not path.exists():
            raise ConfigError(f"--impressions {path}: no such file or directory")
        table = pq.read_table(path)
    else:
        from indexes.engagement_log import EngagementLog
        from indexes.served_log import ServedLog, impressions

        days = _days(since, now)
        served = ServedLog(settings.served_log_dir, settings.kafka.topics.feeds_served).read(days)
        engagement = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement).read(days)
        table = impressions(served, engagement)
    if "served_at" not in table.column_names:
        raise ConfigError("the impressions table has no served_at column")
    at = pa.scalar(since, pa.timestamp("us", tz="UTC"))
    return table.filter(pc.fill_null(pc.greater_equal(table.column("served_at"), at), False))


def _rate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


def render(estimates: dict[str, OffPolicyEstimate], since: datetime, comparison: OffPolicyComparison | None) -> None:
    """One column per evaluated policy; with ``--against``, the paired difference under the table."""
    from rich.console import Console
    from rich.table import Table

    first = next(iter(estimates.values()))
    pct = f"{first.level:.0%}"
    table = Table(title=f"off-policy like rate on the explored slots since {since.isoformat()}")
    table.add_column("measure")
    for name in estimates:
        table.add_column(name, justify="right")
    rows: list[tuple[str, Callable[[OffPolicyEstimate], str]]] = [
        ("estimate (likes per play, SNIPS)", lambda e: _rate(e.value)),
        (f"{pct} bootstrap interval", lambda e: f"{_rate(e.low)} .. {_rate(e.high)}"),
        (f"{pct} delta-method interval", lambda e: f"{_rate(e.delta_low)} .. {_rate(e.delta_high)}"),
        ("logging policy's rate (explored slots)", lambda e: _rate(e.logged_rate)),
        ("pages / explored impressions", lambda e: f"{e.requests} / {e.n}"),
        ("matched (plays, likes)", lambda e: f"{e.matched} ({e.matched_plays}, {e.matched_likes})"),
        ("effective sample size", lambda e: f"{e.ess:.1f}"),
    ]
    if first.invalid:
        rows.append(("explored rows left out (bad propensity or pool)", lambda e: str(e.invalid)))
    for label, cell in rows:
        table.add_row(label, *(cell(e) for e in estimates.values()))
    console = Console()
    console.print(table)
    for name, e in estimates.items():
        if not e.enough:
            console.print(f"not enough for {name}: {e.matched} matched impressions < --min-matched {e.min_matched}")
    if comparison is not None:
        a, b = estimates
        console.print(
            f"{a} - {b}: {_rate(comparison.difference)}, paired {pct} interval "
            f"{_rate(comparison.low)} .. {_rate(comparison.high)}: "
            + (f"{a} is better" if comparison.better else "no call (interval reaches 0, or not enough)")
        )


def run(args: argparse.Namespace) -> int:
    """The command: 0 with an estimate printed (``enough`` false included), 2 on bad input."""
    from ranker.stores import score_store

    settings = Settings()
    resamples = RESAMPLES if args.resamples is None else args.resamples
    min_matched = MIN_MATCHED if args.min_matched is None else args.min_matched
    if resamples < 0 or min_matched < 0 or not 0.0 < args.level < 1.0:
        raise ConfigError("--resamples and --min-matched must be >= 0 and --level in (0, 1)")
    policies = [feed_policy(settings, args.policy)]
    if args.against:
        policies.append(feed_policy(settings, args.against))
    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    table = load_impressions(settings, since, now, Path(args.impressions) if args.impressions else None)
    songs = pool_songs(table)
    store = score_store(settings)
    try:
        scores = [prior_scores(store, policy, songs, time.time()) for policy in policies]
    finally:
        store.close()
    slots = ExploredSlots.from_impressions(table)
    head = {"policy": args.policy, "since": since.isoformat()}
    comparison = None
    if len(scores) == 2:
        comparison = compare_slots(
            slots, scores[0], scores[1], resamples=resamples, seed=args.seed, level=args.level, min_matched=min_matched
        )
        estimates = {args.policy: comparison.candidate, args.against: comparison.incumbent}
        out = {**head, "against": args.against, **comparison.to_dict()}
    else:
        estimate = evaluate_slots(
            slots, scores[0], resamples=resamples, seed=args.seed, level=args.level, min_matched=min_matched
        )
        estimates = {args.policy: estimate}
        out = {**head, **estimate.to_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        render(estimates, since, comparison)
    return 0
