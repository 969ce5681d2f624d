"""Feeds in the score store, kept current as songs are scored and engagement arrives.

Each configured feed is a sorted set of the songs its filters admit, scored with the
time-invariant ``stored`` value of :mod:`ranker.serving.policy`. The worker calls
:func:`write_scored` for each batch it scores; the feedback consumer calls
:meth:`FeedWriter.on_engagement` (``make_engagement_updater``) with the songs whose
counters (``eng.plays``, ``eng.likes``... in the song hash) changed. Both recompute only
those songs: added to every feed whose filters they pass, removed from the others.
Time passing rewrites nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from indexes.base import ScoreStore, SongRecord
from indexes.redis_schema import (
    EXAMINED_PLAYS_FIELD,
    LIKES_FIELD,
    PLAYS_FIELD,
)
from ranker.serving.policy import (
    Policy,
    SongState,
    calibration_scale,
    compile_policies,
    refresh,
)
from ranker.serving.state import WRITE_FIELDS, _float, examined_plays, state_from_fields, state_from_record
from ranker.settings import Settings, get_settings
from ranker.stores import score_store


# -- writes -------------------------------------------------------------------------------------
def _entries(
    policies: Mapping[str, Policy], songs: Iterable[SongState], scale: float, now: float
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, float | None]]]:
    """Per feed, the stored score of each song it admits and None for those it does not."""
    entries: dict[str, dict[str, float | None]] = {name: {} for name in policies}
    ages: dict[str, dict[str, float | None]] = {name: {} for name, p in policies.items() if p.max_age_s is not None}
    for song in songs:
        for name, policy in policies.items():
            keep = policy.admits(song) and (policy.max_age_s is None or now - song.created_ts < policy.max_age_s)
            if keep:
                ev = policy.evaluate(song, scale, now)
                entries[name][song.song_id] = policy.stored_score(ev.quality, song.created_ts)
            else:
                entries[name][song.song_id] = None
            if name in ages:
                ages[name][song.song_id] = song.created_ts if keep else None
    return entries, ages


class FeedWriter:
    """Incremental feed maintenance for every configured feed (worker and feedback consumer)."""

    def __init__(self, settings: Settings, store: ScoreStore | None = None) -> None:
        self.settings = settings
        self.factors: dict[str, float] = {}  # each generator's calibration factor, read with the scale
        self.policies = compile_policies(settings.feed.feeds, settings.feed.like_rate, self.factors)
        self._own_store = store is None
        self.store = store or score_store(settings)

    def scale(self) -> float:
        """The calibration scale; the generators' factors (the policies') are refreshed with it."""
        if self.settings.feed.like_rate.generator_calibration:
            refresh(self.factors, self.store.generator_calibration())
        return calibration_scale(*self.store.calibration_totals(), self.settings.feed.like_rate)

    def on_scored(self, songs: Sequence[SongRecord], now: float | None = None) -> None:
        """Write scored songs and their entries in every feed (keeping engagement already counted)."""
        if not songs:
            return
        now = time.time() if now is None else now
        counts = self.store.read_fields([s.song_id for s in songs], [PLAYS_FIELD, LIKES_FIELD, EXAMINED_PLAYS_FIELD])
        states = [
            state_from_record(song, max(0.0, _float(plays)), max(0.0, _float(likes)), examined_plays(eplays))
            for song, (plays, likes, eplays) in zip(songs, counts, strict=True)
        ]
        entries, ages = _entries(self.policies, states, self.scale(), now)
        self.store.write_feed_entries(songs, entries, ages)

    def recalibrate(self, songs: Sequence[SongRecord]) -> float:
        """Re-claim these songs' share of the calibration totals with their new prior; the new scale.

        For rescoring under a newly promoted model: the totals compare observed likes with what
        the model that scored each song predicted, so a song whose prior changed must be counted
        at its new prior. Otherwise the old model's bias stays in the scale and is applied to the
        new model's priors as well (a model that corrects a 2x under-prediction would have its
        priors doubled again). Call it for every rescored song before writing their entries.
        """
        return self._claim([state_from_record(song, 0.0, 0.0) for song in songs])

    def _claim(self, states: Sequence[SongState]) -> float:
        """Claim these songs' calibration shares at their current prior; the resulting scale (1 when off)."""
        cfg = self.settings.feed.like_rate
        if not cfg.calibrate:
            return 1.0
        first = next(iter(self.policies.values()))  # the prior is the same in every feed
        return calibration_scale(*self.store.claim_calibration({s.song_id: first.prior_rate(s) for s in states}), cfg)

    def on_engagement(self, song_ids: Sequence[str], now: float | None = None) -> int:
        """Recompute the feed entries of songs whose engagement counters changed.

        Folds their plays and likes into the calibration totals first. Songs without
        scores yet are skipped (the worker's write picks their counters up). Returns
        how many songs were updated.
        """
        ids = list(dict.fromkeys(song_ids))
        if not ids:
            return 0
        now = time.time() if now is None else now
        values = self.store.read_fields(ids, WRITE_FIELDS)
        states = [st for sid, v in zip(ids, values, strict=True) if (st := state_from_fields(sid, v)) is not None]
        if not states:
            return 0
        entries, ages = _entries(self.policies, states, self._claim(states), now)
        self.store.write_feed_entries([], entries, ages)
        return len(states)

    def trim(self, now: float | None = None) -> int:
        """Drop songs past their feed's max age (reads filter them anyway; this bounds the sets)."""
        now = time.time() if now is None else now
        removed = 0
        for name, policy in self.policies.items():
            if policy.max_age_s is not None:
                removed += self.store.trim_feed(name, now - policy.max_age_s)
        return removed

    def rebuild(self, now: float | None = None, batch: int = 1000) -> dict[str, int]:
        """Recompute every feed from every song hash and swap each in atomically.

        For a changed feed policy, a new feed, or after the calibration scale moved a
        lot. Cost: one SCAN of the song keys plus one HMGET per song, pipelined.
        """
        now = time.time() if now is None else now
        scale = self.scale()
        members: dict[str, dict[str, float]] = {name: {} for name in self.policies}
        ages: dict[str, dict[str, float]] = {name: {} for name, p in self.policies.items() if p.max_age_s is not None}
        ids: list[str] = []

        def flush() -> None:
            values = self.store.read_fields(ids, WRITE_FIELDS)
            states = [st for sid, v in zip(ids, values, strict=True) if (st := state_from_fields(sid, v)) is not None]
            entries, age_entries = _entries(self.policies, states, scale, now)
            for name, scored in entries.items():
                members[name].update({k: v for k, v in scored.items() if v is not None})
            for name, created in age_entries.items():
                ages[name].update({k: v for k, v in created.items() if v is not None})
            ids.clear()

        for song_id in self.store.scan_song_ids(batch):
            ids.append(song_id)
            if len(ids) >= batch:
                flush()
        if ids:
            flush()
        for name in self.policies:
            self.store.replace_feed(name, members[name], ages.get(name))
        return {name: len(m) for name, m in members.items()}

    def close(self) -> None:
        if self._own_store:
            self.store.close()


#: Age-limited feeds are trimmed by the worker's writes at most this often (per key prefix).
TRIM_EVERY_S = 300.0
_LAST_TRIM: dict[str, float] = {}


def write_scored(store: ScoreStore, settings: Settings, songs: Sequence[SongRecord]) -> None:
    """The worker's write: song hashes plus every configured feed."""
    writer = FeedWriter(settings, store)
    writer.on_scored(songs)
    now = time.monotonic()
    if now - _LAST_TRIM.get(store.namespace, -math.inf) >= TRIM_EVERY_S:
        writer.trim()
        _LAST_TRIM[store.namespace] = now  # after it: a trim (or its change log entry) that failed runs again


_WRITERS: dict[int, FeedWriter] = {}


def on_engagement(song_ids: Sequence[str], settings: Settings | None = None) -> int:
    """Recompute the feed entries of songs whose engagement counters changed (see
    :meth:`FeedWriter.on_engagement`), with one writer kept per settings object."""
    settings = settings or get_settings()
    writer = _WRITERS.get(id(settings))
    if writer is None or writer.settings is not settings:
        writer = _WRITERS[id(settings)] = FeedWriter(settings)
    return writer.on_engagement(song_ids)


def make_engagement_updater(settings: Settings) -> Callable[[Sequence[str]], None]:
    """What the feedback consumer calls with the song ids whose counters changed."""
    writer = FeedWriter(settings)

    def update(song_ids: Sequence[str]) -> None:
        writer.on_engagement(song_ids)

    return update
