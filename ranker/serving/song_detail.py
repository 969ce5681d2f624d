"""``GET /v1/songs/{id}``: one song as every feed sees it (scores, engagement, prior, posterior, Beta)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from indexes.redis_schema import (
    CREATED_AT,
    ENGAGEMENT_COUNTERS,
    GENERATOR,
    MODEL_VERSION,
    OOD_PERCENTILE,
    SCORED_AT,
    UNTRAINED,
    counter_field,
    flag,
)
from ranker.events import TASKS
from ranker.serving.policy import Policy, beta_params
from ranker.serving.state import WRITE_FIELDS, _float, spread, state_from_fields


def song_detail(
    song_id: str, raw: Mapping[str, str], policies: Mapping[str, Policy], default: str, scale: float, now: float
) -> dict[str, Any] | None:
    """The song's hash ``raw`` read for the response; None if it is not scored (engagement alone)."""
    state = state_from_fields(song_id, [raw.get(f) for f in WRITE_FIELDS], now)
    if state is None:
        return None
    feeds: dict[str, Any] = {}
    for name, policy in policies.items():
        ev = policy.evaluate(state, scale, now)
        feeds[name] = {
            "admitted": policy.admits(state) and policy.in_age_window(state.created_ts, now),
            "score": ev.score,
            "quality": ev.quality,
            "freshness": ev.freshness,
            "posterior_rate": ev.posterior_rate,
            "beta": list(beta_params(ev.prior_rate, state.likes, policy.evidence(state), ev.prior_strength)),
            "prior_strength": ev.prior_strength,
        }
    return {
        "song_id": song_id,
        "model_version": raw.get(MODEL_VERSION),
        "untrained": flag(raw.get(UNTRAINED)),
        "generator": raw.get(GENERATOR),
        "created_at": raw.get(CREATED_AT),
        "scored_at": raw.get(SCORED_AT),
        "scores": {t: state.scores[t] for t in TASKS if t in state.scores},
        "engagement": {c: int(_float(raw.get(counter_field(c)))) for c in ENGAGEMENT_COUNTERS},
        "like_rate": {
            "model": state.model_rate,
            "prior": policies[default].prior_rate(state, scale),
            "calibration_scale": scale,
            "generator_factor": policies[default].factors.get(state.generator, 1.0),
            "source": "target_transform" if state.model_rate is not None else "fallback",
            "spread": state.prior_sd,  # the model ensemble's (None: a single head)
            "ood": state.ood,
            "ood_percentile": spread(raw.get(OOD_PERCENTILE)),  # a number read as spreads are: None if unreadable
        },
        "feeds": feeds,
    }
