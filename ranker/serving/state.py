"""A song's ranking state read back from its stored fields, and the model's prior like rate.

Both the feed writer and the reader turn a song hash into a :class:`SongState`; the
scoring path (:mod:`ranker.scoring`) asks for the prior like rate and the cold-start
quality when it scores a new song.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from indexes.base import SongRecord
from indexes.redis_schema import (
    DURATION_S,
    FILTER_FIELDS,
    MODEL_FIELDS,
    OOD_FLAG,
    PRIOR_FIELD,
    PRIOR_SD_FIELD,
    TAGS,
    flag,
    hydration_fields,
)
from ranker.events import TASKS
from ranker.model.targets import TargetTransform
from ranker.serving.policy import (
    EPOCH,
    Policy,
    SongState,
    parse_tags,
    to_timestamp,
)
from ranker.settings import Settings

# The hash fields are indexes.redis_schema's. PRIOR_FIELD holds the model's predicted like rate
# (written by the worker when the model directory has a target transform; absent otherwise, and
# the fallback mapping applies).
#: What a page hydrates per song (the score fields, then schema.STATE_FIELDS, unpacked in that
#: order by state_from_fields), and what a write additionally needs for the filters.
READ_FIELDS: tuple[str, ...] = hydration_fields(TASKS)
WRITE_FIELDS: tuple[str, ...] = (*READ_FIELDS, *FILTER_FIELDS)
#: What the API's song table loads: WRITE_FIELDS, then the model version and its untrained flag.
TABLE_FIELDS: tuple[str, ...] = (*WRITE_FIELDS, *MODEL_FIELDS)
_N_TASKS = len(TASKS)
#: The largest float32: examined plays are kept at float32 precision, capped here (a damaged hash).
F32_MAX = float(np.finfo(np.float32).max)
_N_READ = len(READ_FIELDS)
_N_WRITE = len(WRITE_FIELDS)


# -- song state from hash fields ----------------------------------------------------------------
def _float(value: str | None, default: float = 0.0) -> float:
    if value is None:
        return default
    try:
        out = float(value)
    except ValueError:
        return default
    return out if math.isfinite(out) else default


def created_ts(created_at: str | None, scored_at: str | None) -> float:
    """The creation time (epoch s) that freshness counts from: ``created_at``, but never after ``scored_at``.

    A song cannot have been made after it was scored, so a ``created_at`` later than
    ``scored_at`` (a future date accepted before ingest checked it) counts as
    ``scored_at``. The bound is a fixed point of the song's hash, not the clock: every
    recomputation of the song's feed entries (engagement, a rebuild) stores the same
    freshness term, where a bound of "now" re-dated the song to the instant of each
    engagement event and kept it brand new for ever. (A rescore writes a new
    ``scored_at``, and so re-dates such a song once per rescore.)

    An unreadable ``created_at`` counts as ``scored_at`` (the song was new when scored).
    Without a readable ``scored_at`` (every store write has one: only a hand-made or
    damaged hash lacks it) nothing the hash holds bounds a future date, so the bound is
    :data:`~ranker.serving.policy.EPOCH`, the stored scores' origin: stable, and such a song
    gets no freshness it cannot vouch for (it ranks as if created at EPOCH, or earlier
    if its ``created_at`` is earlier).
    """
    created = to_timestamp(created_at)
    scored = to_timestamp(scored_at)
    bound = scored if scored is not None and math.isfinite(scored) else EPOCH
    if created is None or not math.isfinite(created):
        return bound
    return min(created, bound)


def state_from_fields(song_id: str, values: Sequence[str | None], now: float | None = None) -> SongState | None:
    """A :class:`SongState` from READ_FIELDS (or WRITE_FIELDS) values; None if not scored yet.

    A hash holding only engagement counters (engagement that arrived before the
    scores) is not a rankable song. The creation time is :func:`created_ts`, the same
    whenever it is computed. Reads pass ``now``, the instant they serve at, which caps
    it further: a song whose ``scored_at`` is ahead of this machine's clock (skew) is
    served as brand new, never newer. Writes pass no ``now``: what they store must not
    depend on when they run.
    """
    scores: dict[str, float] = {}
    for task, value in zip(TASKS, values[:_N_TASKS], strict=True):
        if value is not None:
            scores[task] = _float(value)
    if not scores:
        return None
    prior, plays, likes, created_at, generator, scored_at, eplays, prior_sd, ood = values[_N_TASKS:_N_READ]
    created = created_ts(created_at, scored_at)
    if now is not None and created > now:
        created = now
    tags: tuple[str, ...] = ()
    duration: float | None = None
    if len(values) > _N_READ:
        tags = parse_tags(values[_N_READ])
        raw_duration = values[_N_READ + 1]
        duration = _float(raw_duration) if raw_duration is not None else None
    return SongState(
        song_id=song_id,
        scores=scores,
        model_rate=_float(prior) if prior is not None else None,
        plays=max(0.0, _float(plays)),
        likes=max(0.0, _float(likes)),
        created_ts=created,
        generator=generator or "",
        tags=tags,
        duration_s=duration,
        eplays=examined_plays(eplays),
        prior_sd=spread(prior_sd),
        ood=flag(ood),
    )


def spread(value: str | float | None) -> float | None:
    """A stored ``prior.like_rate_sd`` as the policy reads it: None when absent or unreadable, else ``max(0, x)``."""
    if value is None:
        return None
    out = _float(value, math.nan) if isinstance(value, str) else float(value)
    return max(0.0, out) if math.isfinite(out) else None


def examined_plays(value: str | None) -> float | None:
    """A stored ``eng.eplays`` as the policy reads it: None when absent, else ``max(0, x)`` (unreadable: 0)
    at float32 precision, which the API's song table keeps (so its pages equal the store's)."""
    if value is None:
        return None
    return float(np.float32(min(max(0.0, _float(value)), F32_MAX)))


def state_from_record(song: SongRecord, plays: float, likes: float, eplays: float | None = None) -> SongState:
    """A :class:`SongState` of a record being written (creation time: :func:`created_ts`; ``eplays``: the
    stored examined plays, :func:`examined_plays`)."""
    prior = song.extra.get(PRIOR_FIELD)
    sd = song.extra.get(PRIOR_SD_FIELD)
    ood = song.extra.get(OOD_FLAG)
    raw_tags = song.extra.get(TAGS)
    tags = parse_tags(raw_tags) if isinstance(raw_tags, str) else tuple(raw_tags or ())
    duration = song.extra.get(DURATION_S)
    return SongState(
        song_id=song.song_id,
        scores=dict(song.scores),
        model_rate=float(prior) if prior is not None else None,
        plays=plays,
        likes=likes,
        created_ts=created_ts(song.created_at, song.scored_at),
        generator=song.generator,
        tags=tags,
        duration_s=float(duration) if duration is not None else None,
        eplays=eplays,
        prior_sd=spread(sd),
        ood=flag(None if ood is None else str(int(ood)) if isinstance(ood, bool | int | float) else str(ood)),
    )


# -- the model's prior like rate ----------------------------------------------------------------
#: The last transform parsed, keyed by the dict's id() and holding that dict, so that its id
#: cannot be handed to another dict while the entry lives (one model at a time).
_TRANSFORMS: dict[int, tuple[Mapping[str, Any], TargetTransform]] = {}


def model_like_rate(
    transform: Mapping[str, Any] | None, scores: Mapping[str, float], generator: str, created_at: str
) -> float | None:
    """``TargetTransform.expected_rate`` of a song's likes and streams scores; None without a transform."""
    if not transform or "likes" not in scores or "streams" not in scores:
        return None
    hit = _TRANSFORMS.get(id(transform))
    if hit is not None and hit[0] is transform:
        parsed = hit[1]
    else:
        parsed = TargetTransform.from_dict(transform)
        _TRANSFORMS.clear()  # one model at a time
        _TRANSFORMS[id(transform)] = (transform, parsed)
    cohort = parsed.cohort == "generator_week"
    rate = parsed.expected_rate(
        scores["likes"],
        scores["streams"],
        generator=generator if cohort else None,
        created_at=created_at if cohort else None,
    )
    return float(np.asarray(rate).reshape(-1)[0])


def cold_start_quality(settings: Settings, scores: Mapping[str, float], model_rate: float | None) -> float:
    """The default feed's quality of an unplayed song, uncalibrated: songs.scored's rank_score."""
    policy = Policy(settings.feed.name, settings.feed.default, settings.feed.like_rate)
    song = SongState("", scores, model_rate, 0.0, 0.0, 0.0, "")
    return policy.quality(song, policy.prior_rate(song))
