"""The cold-start prior: one number per song blended from its seven APEX scores.

Each score is rescaled to 0-1 (popularity 0-100 -> /100, aesthetics 1-5 ->
(x-1)/4) and averaged with the feed's weights. Freshness, evidence and
exploration are applied by the ranker on top of this prior.
"""

from __future__ import annotations

from collections.abc import Mapping

from ranker.events import POPULARITY_TASKS, TASKS


def unit_score(task: str, value: float) -> float:
    """A task's score on 0-1."""
    if task in POPULARITY_TASKS:
        unit = value / 100.0
    elif task in TASKS:
        unit = (value - 1.0) / 4.0
    else:
        raise KeyError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return min(1.0, max(0.0, unit))


def prior_score(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of the unit scores; tasks missing from ``scores`` are left out."""
    total = 0.0
    norm = 0.0
    for task, weight in weights.items():
        if weight == 0 or task not in scores:
            continue
        total += weight * unit_score(task, scores[task])
        norm += abs(weight)
    return total / norm if norm else 0.0
