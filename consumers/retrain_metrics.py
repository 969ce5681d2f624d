"""What a retrain run pushes to a Prometheus Pushgateway (``retrain.pushgateway_url``, job ``apexrank_retrain``).

A CronJob's pod is gone before Prometheus would scrape it, so each run pushes its report's
figures instead. The metrics live in registries of their own (never the process's default
one, which ``--metrics-port`` would serve) and are pushed with POST (``pushadd``), which
replaces only the metric names pushed: a failed run pushes its last-run time alone
(:data:`RUN`), so the gateway keeps the last success time and the figures of the last run
that finished, and the "no successful retrain" alert keeps counting from the right time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ranker.events import POPULARITY_TASKS

if TYPE_CHECKING:
    from ranker.model.retrain import RetrainReport
    from ranker.settings import Settings

log = logging.getLogger(__name__)

JOB = "apexrank_retrain"
PUSH_TIMEOUT_S = 10.0

#: Pushed by every run, failed or not.
RUN = CollectorRegistry(auto_describe=True)
#: Pushed by runs that finish (promoting or not).
RESULT = CollectorRegistry(auto_describe=True)

LAST_RUN = Gauge(
    "apexrank_retrain_last_run_timestamp_seconds", "When the last retrain run ended (failed or not)", registry=RUN
)
LAST_SUCCESS = Gauge(
    "apexrank_retrain_last_success_timestamp_seconds",
    "When the last retrain run that finished (promoting or not) ended",
    registry=RESULT,
)
PROMOTED = Gauge(
    "apexrank_retrain_promoted", "1 if the last finished run promoted its candidate, else 0", registry=RESULT
)
HOLDOUT_SPEARMAN = Gauge(
    "apexrank_retrain_holdout_spearman",
    "Spearman on the time-based holdout, per model (candidate, current) and task; NaN when not evaluated",
    ["model", "task"],
    registry=RESULT,
)
SONGS = Gauge("apexrank_retrain_songs", "Songs the last finished run trained on and held out", ["set"], registry=RESULT)
STEP_SECONDS = Gauge(
    "apexrank_retrain_step_seconds",
    "Wall time of each step of the last finished run (gather, train, evaluate, rescore, total)",
    ["step"],
    registry=RESULT,
)


class _Both(Collector):
    """Both registries as one push (one request)."""

    def collect(self) -> Iterable[Metric]:
        yield from RUN.collect()
        yield from RESULT.collect()


def record(report: RetrainReport | None, now: float | None = None) -> Collector:
    """Set the gauges from ``report`` (``None``: the run failed); returns what to push."""
    now = time.time() if now is None else now
    LAST_RUN.set(now)
    if report is None:
        return RUN
    LAST_SUCCESS.set(now)
    PROMOTED.set(1 if report.promoted else 0)
    for model, figures in (("candidate", report.candidate), ("current", report.current)):
        for task in POPULARITY_TASKS:
            HOLDOUT_SPEARMAN.labels(model, task).set(figures.get(task, math.nan))
    SONGS.labels("train").set(report.n_train)
    SONGS.labels("holdout").set(report.n_holdout)
    STEP_SECONDS.clear()  # a step this run skipped (rescore) must not keep an earlier run's time
    for step, seconds in report.timings_s.items():
        STEP_SECONDS.labels(step).set(seconds)
    return _Both()


def push(settings: Settings, report: RetrainReport | None) -> bool:
    """Record ``report`` and push it when a Pushgateway is configured; True when pushed."""
    url = settings.retrain.pushgateway_url
    collector = record(report)
    if not url:
        return False
    try:
        pushadd_to_gateway(url, job=JOB, registry=collector, timeout=PUSH_TIMEOUT_S)
    except Exception as exc:  # the figures are lost, the retrain is not
        log.warning("could not push the retrain metrics to %s: %s: %s", url, type(exc).__name__, exc)
        return False
    return True
