"""Feeds in Redis: kept current as songs are scored and engagement arrives, and read page by page.

Writes. Each configured feed is a sorted set of the songs its filters admit,
scored with the time-invariant ``stored`` value of :mod:`ranker.policy`. The
worker calls :func:`write_scored` for each batch it scores; the feedback consumer
calls :meth:`FeedWriter.on_engagement` (``make_engagement_updater``) with the
songs whose counters (``eng.plays``, ``eng.likes``... in the song hash, HINCRBY)
changed. Both recompute only those songs: ZADD into every feed whose filters
they pass, ZREM from the others. Time passing rewrites nothing.

Reads. :class:`FeedReader` serves a page with one ZRANGE and one pipelined
HMGET (hydration), then assembles it: exploit slots in stored order, near-duplicates
and songs over the per-generator cap pushed down, exploration slots filled by
Thompson sampling from the songs just below. The cursor is keyset based (see
:class:`Cursor` and docs/ranking.md for what stays stable while the feed changes).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from cachetools import TTLCache

from indexes.base import ScoreStore, SongRecord, song_key
from indexes.redis_store import (
    ENGAGEMENT_COUNTERS,
    ENGAGEMENT_FIELD_PREFIX,
    SCORE_FIELD_PREFIX,
    AsyncStoreReads,
    RedisScoreStore,
    RedisStoreConfig,
)
from ranker.events import TASKS
from ranker.model.targets import TargetTransform
from ranker.policy import (
    EPOCH,
    Evaluation,
    Policy,
    SongState,
    beta_params,
    calibration_scale,
    compile_policies,
    explore_positions,
    explore_slots,
    parse_tags,
    to_timestamp,
)
from ranker.settings import FeedPolicy, Settings, get_settings

#: Hash field holding the model's predicted like rate (written by the worker when the model
#: directory has a target transform; absent otherwise, and the fallback mapping applies).
PRIOR_FIELD = "prior.like_rate"
PLAYS_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}plays"
LIKES_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}likes"
#: What a page hydrates per song, and what a write additionally needs for the filters.
READ_FIELDS: tuple[str, ...] = (
    *(SCORE_FIELD_PREFIX + t for t in TASKS),
    PRIOR_FIELD,
    PLAYS_FIELD,
    LIKES_FIELD,
    "created_at",
    "generator",
    "scored_at",
)
WRITE_FIELDS: tuple[str, ...] = (*READ_FIELDS, "tags", "duration_s")
_N_TASKS = len(TASKS)
_N_READ = len(READ_FIELDS)
_MAX_FETCHES = 4
MAX_SKIP = 512


class UnknownFeedError(KeyError):
    """No feed of that name is configured."""


class CursorError(ValueError):
    """A cursor that is malformed or belongs to another feed."""


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
    :data:`~ranker.policy.EPOCH`, the stored scores' origin: stable, and such a song
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
    prior, plays, likes, created_at, generator, scored_at = values[_N_TASKS:_N_READ]
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
    )


def state_from_record(song: SongRecord, plays: float, likes: float) -> SongState:
    """A :class:`SongState` of a record being written (creation time: :func:`created_ts`)."""
    prior = song.extra.get(PRIOR_FIELD)
    raw_tags = song.extra.get("tags")
    tags = parse_tags(raw_tags) if isinstance(raw_tags, str) else tuple(raw_tags or ())
    duration = song.extra.get("duration_s")
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
    )


# -- the model's prior like rate ----------------------------------------------------------------
_TRANSFORMS: dict[int, TargetTransform] = {}


def model_like_rate(
    transform: Mapping[str, Any] | None, scores: Mapping[str, float], generator: str, created_at: str
) -> float | None:
    """``TargetTransform.expected_rate`` of a song's likes and streams scores; None without a transform."""
    if not transform or "likes" not in scores or "streams" not in scores:
        return None
    parsed = _TRANSFORMS.get(id(transform))
    if parsed is None:
        parsed = TargetTransform.from_dict(transform)
        _TRANSFORMS.clear()  # one model at a time
        _TRANSFORMS[id(transform)] = parsed
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

    def __init__(self, settings: Settings, store: RedisScoreStore | None = None) -> None:
        self.settings = settings
        self.policies = compile_policies(settings.feed.feeds, settings.feed.like_rate)
        self._own_store = store is None
        self.store = store or RedisScoreStore(
            RedisStoreConfig(
                url=settings.redis.url.get_secret_value(),
                key_prefix=settings.redis.key_prefix,
                socket_timeout_s=settings.redis.socket_timeout_s,
            )
        )

    def scale(self) -> float:
        return calibration_scale(*self.store.calibration_totals(), self.settings.feed.like_rate)

    def on_scored(self, songs: Sequence[SongRecord], now: float | None = None) -> None:
        """Write scored songs and their entries in every feed (keeping engagement already counted)."""
        if not songs:
            return
        now = time.time() if now is None else now
        counts = self.store.read_fields([s.song_id for s in songs], [PLAYS_FIELD, LIKES_FIELD])
        states = [
            state_from_record(song, max(0.0, _float(plays)), max(0.0, _float(likes)))
            for song, (plays, likes) in zip(songs, counts, strict=True)
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
    """The worker's write: song hashes plus every configured feed (one feed for other stores)."""
    if isinstance(store, RedisScoreStore):
        writer = FeedWriter(settings, store)
        writer.on_scored(songs)
        now = time.monotonic()
        if now - _LAST_TRIM.get(store.prefix, -math.inf) >= TRIM_EVERY_S:
            _LAST_TRIM[store.prefix] = now
            writer.trim()
    else:  # a store without feed support keeps the default feed by the prior alone
        store.write_songs(songs, settings.feed.name)


def with_prior(songs: Sequence[SongRecord], transform: Mapping[str, Any] | None) -> list[SongRecord]:
    """Records carrying the model's like rate in PRIOR_FIELD (unchanged without a transform)."""
    if not transform:
        return list(songs)
    out = []
    for song in songs:
        rate = model_like_rate(transform, song.scores, song.generator, song.created_at)
        out.append(song if rate is None else replace(song, extra={**song.extra, PRIOR_FIELD: rate}))
    return out


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


# -- cursors ------------------------------------------------------------------------------------
_CURSOR_VERSION = 1
_HEAD = struct.Struct(">BId")  # version, feed tag, boundary score
_SKIP_BYTES = 6


def _feed_tag(feed: str) -> int:
    return zlib.crc32(feed.encode("utf-8"))


def _skip_key(song_id: str) -> int:
    """48 bits of the song's key: enough to tell apart the few hundred ids a cursor skips."""
    return song_key(song_id) >> 15


@dataclass(frozen=True)
class Cursor:
    """Where a walk through a feed stands: the last (score, song_id) passed, plus songs served
    out of order (exploration picks and songs served past a pushed-down one) to skip later.

    Encoded as url-safe base64 of a small binary record; bound to its feed.
    """

    feed: str
    score: float
    song_id: str
    skip: frozenset[int] = field(default_factory=frozenset)

    def encode(self) -> str:
        sid = self.song_id.encode("ascii")
        raw = (
            _HEAD.pack(_CURSOR_VERSION, _feed_tag(self.feed), self.score)
            + struct.pack(">B", len(sid))
            + sid
            + struct.pack(">H", len(self.skip))
            + b"".join(k.to_bytes(_SKIP_BYTES, "big") for k in sorted(self.skip))
        )
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, feed: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            version, tag, score = _HEAD.unpack_from(raw, 0)
            pos = _HEAD.size
            (n_id,) = struct.unpack_from(">B", raw, pos)
            pos += 1
            sid = raw[pos : pos + n_id].decode("ascii")
            pos += n_id
            (n_skip,) = struct.unpack_from(">H", raw, pos)
            pos += 2
            body = raw[pos:]
        except (binascii.Error, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise CursorError("malformed cursor: pass back next_cursor exactly as received") from exc
        if version != _CURSOR_VERSION or len(sid) != n_id or len(body) != n_skip * _SKIP_BYTES:
            raise CursorError("malformed cursor: pass back next_cursor exactly as received")
        if tag != _feed_tag(feed):
            raise CursorError(f"this cursor belongs to another feed than {feed!r}")
        if math.isnan(score):
            raise CursorError("malformed cursor: pass back next_cursor exactly as received")
        skip = frozenset(int.from_bytes(body[i : i + _SKIP_BYTES], "big") for i in range(0, len(body), _SKIP_BYTES))
        return cls(feed, score, sid, skip)


def _after(score: float, song_id: str, b_score: float, b_id: str) -> bool:
    """Whether (score, song_id) comes after the boundary in ZRANGE REV order (score desc, id desc)."""
    return score < b_score or (score == b_score and song_id < b_id)


# -- reads --------------------------------------------------------------------------------------
class VectorSource(Protocol):
    def vectors(self, song_ids: Sequence[str]) -> dict[str, np.ndarray]: ...


@dataclass
class _Row:
    song_id: str
    stored: float
    state: SongState | None = None  # None: dropped (skipped, not scored, outside the age window)


@dataclass
class _Window:
    """A fetched stretch of a feed: every row read, the eligible ones hydrated, their cosines."""

    fetched_at: float
    rows: list[_Row] = field(default_factory=list)
    eligible: list[_Row] = field(default_factory=list)
    exhausted: bool = False
    slot: dict[str, int] = field(default_factory=dict)
    gram: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))


#: Estimated bytes of one fetched row (the _Row, its id string, its place in the window's lists),
#: of a hydrated row's SongState (seven scores in a dict, the generator, tags, five floats), of a
#: vector slot, and of a window and its cache entry beyond those. From sys.getsizeof on CPython,
#: rounded up: the cache's byte total is an estimate, good to some tens of percent.
_ROW_BYTES = 200
_STATE_BYTES = 650
_SLOT_BYTES = 100
_WINDOW_BYTES = 600


def window_nbytes(window: _Window, key: tuple[str, str, int] | None = None) -> int:
    """An estimate of the memory a cached window holds: its gram matrix plus a per-row estimate."""
    size = _WINDOW_BYTES + int(window.gram.nbytes) + _SLOT_BYTES * len(window.slot)
    for row in window.rows:
        size += _ROW_BYTES + len(row.song_id)
        if row.state is not None:
            size += _STATE_BYTES + sys.getsizeof(row.state.generator) + 60 * len(row.state.tags)
    if key is not None:
        size += sum(len(part) for part in key[:2])
    return size


@dataclass(frozen=True, slots=True)
class _Entry:
    window: _Window
    nbytes: int


class PageCache:
    """Fetched feed windows reused for ``ttl_s`` by requests for the same page, within ``max_bytes``.

    A thin layer over cachetools' ``TTLCache`` sized in bytes (:func:`window_nbytes`
    estimates each entry): an insert first drops every expired entry, then the least
    recently used until the new one fits; a window larger than the whole budget is not
    cached. An entry's expiry is fixed when it is inserted (a hit does not extend it).
    """

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.enabled = ttl_s > 0 and max_bytes > 0
        self._cache: TTLCache[tuple[str, str, int], _Entry] = TTLCache(
            maxsize=max(1, max_bytes), ttl=ttl_s if ttl_s > 0 else 1.0, timer=clock, getsizeof=_entry_size
        )

    @property
    def nbytes(self) -> int:
        """The estimated bytes of the windows held now."""
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: tuple[str, str, int]) -> _Window | None:
        entry = self._cache.get(key)
        return entry.window if entry is not None else None

    def put(self, key: tuple[str, str, int], window: _Window) -> None:
        if not self.enabled:
            return
        self._cache.pop(key, None)
        with contextlib.suppress(ValueError):  # larger than the whole budget: not cached
            self._cache[key] = _Entry(window, window_nbytes(window, key))

    def expire(self) -> int:
        """Drop every expired entry; how many were dropped."""
        return len(self._cache.expire())

    def clear(self) -> None:
        self._cache.clear()


def _entry_size(entry: _Entry) -> int:
    return entry.nbytes


@dataclass
class FeedPage:
    feed: str
    items: list[dict[str, Any]]
    next_cursor: str | None


class FeedReader:
    """The API's read path: feed pages, reranking of candidates, a song's record."""

    def __init__(
        self,
        settings: Settings,
        reads: AsyncStoreReads,
        vectors: VectorSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is the wall clock scores are computed at; ``monotonic`` times the caches."""
        self.settings = settings
        self.reads = reads
        self.vectors = vectors
        self.policies = compile_policies(settings.feed.feeds, settings.feed.like_rate)
        self._clock = clock
        self._monotonic = monotonic
        self._scale = 1.0
        self._scale_at = -math.inf
        self.page_cache = PageCache(settings.api.page_cache_ttl_s, settings.api.page_cache_max_bytes, monotonic)

    def policy(self, feed: str) -> Policy:
        try:
            return self.policies[feed]
        except KeyError:
            raise UnknownFeedError(feed) from None

    def inline_policy(self, base: str | None, overrides: Mapping[str, Any]) -> Policy:
        """A named feed's policy (default feed if None) with some fields replaced; ValueError if invalid.

        Beyond FeedPolicy's own bounds, a half-life so short that its decay rate is not a
        finite number (below about 1e-316 hours) is refused: freshness would be NaN.
        """
        name = base or self.settings.feed.name
        config = self.policy(name).config
        merged = FeedPolicy.model_validate({**config.model_dump(), **overrides})
        policy = Policy(name, merged, self.settings.feed.like_rate)
        if not math.isfinite(policy.decay):
            raise ValueError(f"half_life_hours: {merged.half_life_hours!r} is too short to decay by")
        return policy

    async def scale(self) -> float:
        """The calibration scale, cached for ``api.calibration_ttl_s``."""
        now = self._monotonic()
        if now - self._scale_at >= self.settings.api.calibration_ttl_s:
            totals = await self.reads.calibration_totals()
            self._scale = calibration_scale(*totals, self.settings.feed.like_rate)
            self._scale_at = now
        return self._scale

    # -- pages ---------------------------------------------------------------------------------
    async def page(
        self,
        feed: str,
        limit: int,
        cursor: str | None = None,
        *,
        rng: np.random.Generator | None = None,
    ) -> FeedPage:
        policy = self.policy(feed)
        cur = Cursor.decode(cursor, feed) if cursor else None
        now = self._clock()
        scale = await self.scale()
        n_explore = explore_slots(limit, policy.config.explore_share)
        window = await self._window(policy, limit + (policy.config.explore_pool if n_explore else 0), cur, cursor, now)
        chosen, explored = self._assemble(policy, window, limit - n_explore, n_explore, scale, now, rng)
        items = self._items(policy, chosen, explored, scale, now)
        skip = set(cur.skip) if cur else set()
        b_score, b_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        next_cursor = self._next_cursor(feed, window.rows, items, skip, b_score, b_id, window.exhausted)
        return FeedPage(feed, items, next_cursor)

    async def _window(self, policy: Policy, want: int, cur: Cursor | None, token: str | None, now: float) -> _Window:
        """The rows after the cursor, hydrated, until ``want`` are eligible (ZRANGE + HMGET, rarely more).

        Reused for ``api.page_cache_ttl_s`` by requests for the same page: a hot first page
        then costs no Redis round trip (it is at most that many seconds stale). The cache
        holds at most ``api.page_cache_max_bytes`` (:class:`PageCache`).
        """
        cache = self.page_cache
        key = (policy.name, token or "", want)
        if cache.enabled:
            hit = cache.get(key)
            if hit is not None:
                return hit
        skip = cur.skip if cur else frozenset()
        start_score, start_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        found = _Window(self._monotonic())
        for _ in range(_MAX_FETCHES):
            count = want - len(found.eligible) + 8
            rows = await self.reads.feed_window(policy.name, None if math.isinf(start_score) else start_score, count)
            found.exhausted = len(rows) < count
            fresh = [_Row(s, sc) for s, sc in rows if _after(sc, s, start_score, start_id)]
            todo = [r for r in fresh if _skip_key(r.song_id) not in skip]
            values = await self.reads.read_fields([r.song_id for r in todo], READ_FIELDS)
            for row, v in zip(todo, values, strict=True):
                state = state_from_fields(row.song_id, v, now)
                if state is not None and policy.in_age_window(state.created_ts, now):
                    row.state = state
                    found.eligible.append(row)
            found.rows.extend(fresh)
            if found.exhausted or len(found.eligible) >= want or not rows:
                break
            start_score, start_id = rows[-1][1], rows[-1][0]
        if policy.config.dedup_threshold is not None and self.vectors is not None and found.eligible:
            vectors = self.vectors.vectors([r.song_id for r in found.eligible])
            if vectors:
                found.slot = {sid: n for n, sid in enumerate(vectors)}
                matrix = np.stack(list(vectors.values()))
                found.gram = matrix @ matrix.T  # cosines between every pair of candidates, once
        cache.put(key, found)
        return found

    def _assemble(
        self,
        policy: Policy,
        window: _Window,
        n_exploit: int,
        n_explore: int,
        scale: float,
        now: float,
        rng: np.random.Generator | None,
    ) -> tuple[list[_Row], list[tuple[_Row, float]]]:
        """Exploit slots (diversity rules push offenders down), then Thompson-sampled exploration."""
        cfg = policy.config
        cap = cfg.max_per_generator
        threshold = cfg.dedup_threshold
        eligible, slot, gram = window.eligible, window.slot, window.gram
        per_gen: Counter[str] = Counter()
        placed: list[int] = []

        def fits(row: _Row) -> bool:
            assert row.state is not None
            if cap is not None and per_gen[row.state.generator] >= cap:
                return False
            n = slot.get(row.song_id)
            if n is not None and placed and threshold is not None:
                return float(gram[n, placed].max()) <= threshold
            return True

        def place(row: _Row) -> None:
            assert row.state is not None
            per_gen[row.state.generator] += 1
            n = slot.get(row.song_id)
            if n is not None:
                placed.append(n)

        chosen: list[_Row] = []
        deferred: list[_Row] = []
        i = 0
        while len(chosen) < n_exploit and i < len(eligible):
            row = eligible[i]
            i += 1
            if fits(row):
                place(row)
                chosen.append(row)
            else:
                deferred.append(row)
        explored: list[tuple[_Row, float]] = []
        pool = eligible[i : i + cfg.explore_pool] if n_explore else []
        if pool:
            states = [r.state for r in pool if r.state is not None]
            rates = policy.sample_rates(states, scale, rng or np.random.default_rng())
            sampled = [policy.sampled_score(s, float(rate), now) for s, rate in zip(states, rates, strict=True)]
            for j in sorted(range(len(pool)), key=lambda j: -sampled[j]):
                if len(explored) == n_explore:
                    break
                if fits(pool[j]):
                    place(pool[j])
                    explored.append((pool[j], float(rates[j])))
        taken = {id(r) for r, _ in explored}
        short = n_exploit + n_explore - len(chosen) - len(explored)
        if short > 0:  # too few beyond the exploit slots to explore, or the feed ends
            for row in eligible[i:]:
                if short == 0:
                    break
                if id(row) not in taken and fits(row):
                    place(row)
                    chosen.append(row)
                    taken.add(id(row))
                    short -= 1
            # Diversity rules give way only when nothing else is left: pushed down, not dropped.
            chosen.extend(deferred[:short])
        return chosen, explored

    def _items(
        self,
        policy: Policy,
        chosen: list[_Row],
        explored: list[tuple[_Row, float]],
        scale: float,
        now: float,
    ) -> list[dict[str, Any]]:
        items = [self._item(policy, r, scale, now) for r in chosen]
        positions = explore_positions(len(chosen) + len(explored), len(explored))
        for pos, (row, rate) in zip(positions, explored, strict=True):
            item = self._item(policy, row, scale, now)
            item["explore"] = True
            item["components"]["sampled_rate"] = rate
            items.insert(pos, item)
        return items

    @staticmethod
    def _item(policy: Policy, row: _Row, scale: float, now: float) -> dict[str, Any]:
        assert row.state is not None
        ev = policy.evaluate(row.state, scale, now)
        return {
            "song_id": row.song_id,
            "score": ev.score,
            "explore": False,
            "components": policy.explain(row.state, ev, now),
        }

    @staticmethod
    def _next_cursor(
        feed: str,
        rows: list[_Row],
        items: list[dict[str, Any]],
        skip: set[int],
        b_score: float,
        b_id: str,
        exhausted: bool,
    ) -> str | None:
        """Advance the boundary over the longest run of rows that are served or dropped; songs
        served beyond it go into the skip set, skip entries passed by it leave."""
        served = {item["song_id"] for item in items}
        passed = 0
        for row in rows:
            if row.state is not None and row.song_id not in served:
                break
            passed += 1
        if passed:
            b_score, b_id = rows[passed - 1].stored, rows[passed - 1].song_id
        left = {_skip_key(r.song_id) for r in rows[:passed]}
        ahead = {_skip_key(r.song_id) for r in rows[passed:] if r.song_id in served}
        remaining = rows[passed:]
        if exhausted and not any(r.state is not None and r.song_id not in served for r in remaining):
            return None
        new_skip = ahead | (skip - left)
        if len(new_skip) > MAX_SKIP:
            new_skip = ahead | set(sorted(skip - left)[: MAX_SKIP - len(ahead)])
        return Cursor(feed, b_score, b_id, frozenset(new_skip)).encode()

    # -- rerank --------------------------------------------------------------------------------
    async def rank(
        self, candidates: Sequence[str], policy: Policy, *, apply_filters: bool = False, explain: bool = True
    ) -> dict[str, Any]:
        """Order known candidates by the policy's score; unknown (unscored) and filtered ids listed apart."""
        now = self._clock()
        scale = await self.scale()
        fields = WRITE_FIELDS if apply_filters else READ_FIELDS
        values = await self.reads.read_fields(candidates, fields)
        scored: list[tuple[SongState, Evaluation]] = []
        unknown: list[str] = []
        filtered: list[str] = []
        for song_id, v in zip(candidates, values, strict=True):
            state = state_from_fields(song_id, v, now)
            if state is None:
                unknown.append(song_id)
            elif apply_filters and not (policy.admits(state) and policy.in_age_window(state.created_ts, now)):
                filtered.append(song_id)
            else:
                scored.append((state, policy.evaluate(state, scale, now)))
        scored.sort(key=lambda se: (-se[1].score, se[0].song_id))
        return {
            "feed": policy.name,
            "items": [
                {"song_id": s.song_id, "score": ev.score, "components": policy.explain(s, ev, now)}
                if explain
                else {"song_id": s.song_id, "score": ev.score}
                for s, ev in scored
            ],
            "unknown": unknown,
            "filtered": filtered,
        }

    # -- one song ------------------------------------------------------------------------------
    async def song(self, song_id: str) -> dict[str, Any] | None:
        """A song's scores, engagement, prior and posterior per feed; None if it is not scored."""
        raw = await self.reads.get_song(song_id)
        if not raw:
            return None
        now = self._clock()
        extended = [raw.get(f) for f in WRITE_FIELDS]
        state = state_from_fields(song_id, extended, now)
        if state is None:
            return None
        scale = await self.scale()
        feeds: dict[str, Any] = {}
        for name, policy in self.policies.items():
            ev = policy.evaluate(state, scale, now)
            feeds[name] = {
                "admitted": policy.admits(state) and policy.in_age_window(state.created_ts, now),
                "score": ev.score,
                "quality": ev.quality,
                "freshness": ev.freshness,
                "posterior_rate": ev.posterior_rate,
                "beta": list(beta_params(ev.prior_rate, state.likes, state.plays, policy.w)),
                "prior_strength": policy.w,
            }
        default = self.policies[self.settings.feed.name]
        return {
            "song_id": song_id,
            "model_version": raw.get("model_version"),
            "generator": raw.get("generator"),
            "created_at": raw.get("created_at"),
            "scored_at": raw.get("scored_at"),
            "scores": {t: state.scores[t] for t in TASKS if t in state.scores},
            "engagement": {c: int(_float(raw.get(ENGAGEMENT_FIELD_PREFIX + c))) for c in ENGAGEMENT_COUNTERS},
            "like_rate": {
                "model": state.model_rate,
                "prior": default.prior_rate(state, scale),
                "calibration_scale": scale,
                "source": "target_transform" if state.model_rate is not None else "fallback",
            },
            "feeds": feeds,
        }
