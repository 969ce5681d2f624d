"""Redis score store: one hash per song and one sorted set per feed, on one node or Redis Cluster.

The URL picks the client (:mod:`indexes.redis_client`): ``redis://``, ``rediss://`` or
``unix://`` for one node, ``redis+cluster://host:port[,host:port...]`` or ``rediss+cluster://``
for Redis Cluster. On a cluster every script call touches one song's slot (the per-song
paths are chosen up front), and SCAN visits every master.

The keys and the fields of a song hash are :mod:`indexes.redis_schema`'s. ``extra``
values of a record are stored under their own key (names that clash with the
reserved fields or start with ``score.`` are refused), strings as-is and anything
else JSON-encoded. A write merges fields (HSET): a replay changes nothing, and
fields written by other components into the same hash (the engagement counters
``eng.<counter>``, the calibration claims ``cal.*``) survive; only the model's optional fields
the new record lacks are deleted, in the same script call (see the schema). A taken-down song (a tombstone,
:mod:`indexes.redis_tombstones`) is never written again: a write racing its deletion is undone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from indexes import redis_gone
from indexes import redis_retention as retention
from indexes import redis_tombstones as tombstones
from indexes.base import AsyncScoreReads, Deletion, FeedEntries, Gone, ScoreStore, SongRecord, StoredSong
from indexes.redis_client import UNREACHABLE, SyncClient, connect, cross_slot, is_cluster_url, run_script_calls
from indexes.redis_queries import HMGET_MANY, FieldsRead, as_record, factors, pairs, totals, window_query
from indexes.redis_reads import AsyncStoreReads
from indexes.redis_schema import (
    CALIBRATION_FIELDS,
    CHANGE_FEEDS,
    CHANGE_IDS,
    MODEL_OPTIONAL_FIELDS,
    MODEL_OPTIONAL_PREFIXES,
    RedisKeys,
    check_name,
    check_prefix,
    parse_song,
    song_fields,
)
from indexes.redis_store_scripts import CLAIM_CALIBRATION, CLAIM_CALIBRATION_MANY, SWAP_REBUILT, WRITE_SONG

if TYPE_CHECKING:
    from redis.client import Pipeline
    from redis.cluster import ClusterPipeline


class RedisStoreConfig(BaseModel):
    """Connection and key-prefix settings for :class:`RedisScoreStore`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        description="redis://, rediss:// or unix:// URL (one node), or redis+cluster://host:port[,host:port...] "
        "or rediss+cluster:// (Redis Cluster)."
    )
    key_prefix: str = "apexrank"
    socket_timeout_s: float = Field(5.0, gt=0)
    changes_retention_s: float = Field(
        600.0,
        ge=60,
        description="How long the change log keeps an entry (trimmed by time, so its memory follows the write "
        "rate: about 40 bytes per song id written). An API process that falls further behind, or whose full "
        "load takes longer, reads the store again whole.",
    )
    tombstone_retention_s: float | None = Field(
        None, gt=0, description="How long a taken-down song's tombstone is kept; None: forever."
    )

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return check_prefix(value)


class RedisScoreStore(ScoreStore):
    """:class:`ScoreStore` on Redis: one node, a proxy, or Redis Cluster (chosen by the URL scheme).

    The client connects on first use (a cluster client reads the slot map then), so a store
    can be built while Redis is down. Connection and timeout errors propagate as
    ``redis.exceptions.ConnectionError`` / ``TimeoutError`` so the worker can retry; writes
    are idempotent, so a retry after an unknown outcome is safe.
    """

    #: The options :func:`indexes.open_score_store` validates for this backend.
    config_type: ClassVar[type[BaseModel]] = RedisStoreConfig

    def __init__(self, config: RedisStoreConfig) -> None:
        self.config = config
        self.prefix = config.key_prefix
        self.keys = RedisKeys(config.key_prefix)
        #: Whether the URL names Redis Cluster (``redis+cluster://``): every call then touches one slot.
        self.cluster = is_cluster_url(config.url)
        #: Multi-key scripts over many songs' hashes: one call per batch on one node. Never on a
        #: cluster (its client refuses keys of several slots); behind a proxy that refuses them
        #: (CROSSSLOT) the per-song pipelines are used from then on.
        self.multi_key_scripts = not self.cluster

    @cached_property
    def _redis(self) -> SyncClient:
        return connect(self.config.url, self.config.socket_timeout_s)

    @cached_property
    def _claim(self) -> Any:
        return self._redis.register_script(CLAIM_CALIBRATION)

    @cached_property
    def _claim_many(self) -> Any:
        return self._redis.register_script(CLAIM_CALIBRATION_MANY)

    @cached_property
    def _write_song_sha(self) -> str:
        return str(self._redis.register_script(WRITE_SONG).sha)

    @cached_property
    def _hmget_many(self) -> Any:
        return self._redis.register_script(HMGET_MANY)

    @cached_property
    def _swap(self) -> Any:
        return self._redis.register_script(SWAP_REBUILT)

    @classmethod
    def from_config(cls, config: RedisStoreConfig) -> RedisScoreStore:
        return cls(config)

    @property
    def namespace(self) -> str:
        return self.prefix

    # -- keys (indexes.redis_schema) -----------------------------------------------------
    def song_key(self, song_id: str) -> str:
        return self.keys.song(song_id)

    def feed_key(self, feed: str) -> str:
        return self.keys.feed(feed)

    def age_key(self, feed: str) -> str:
        return self.keys.feed_age(feed)

    def calibration_key(self) -> str:
        return self.keys.calibration()

    # -- writes -------------------------------------------------------------------------
    def write_songs(self, songs: Sequence[SongRecord], feed: str) -> None:
        """HSET every song's hash and ZADD it to ``feed``, in one pipelined round trip.

        Everything is validated before anything is sent, so a bad record cannot
        leave half a batch written.
        """
        feed_key = self.feed_key(feed)
        prepared: list[tuple[str, dict[str, str]]] = []
        members: dict[str, float] = {}
        for song in songs:
            if not math.isfinite(song.rank_score):
                raise ValueError(f"song {song.song_id!r}: rank_score must be finite, got {song.rank_score}")
            prepared.append((self.song_key(song.song_id), song_fields(song)))
            members[song.song_id] = float(song.rank_score)
        if not prepared:
            return

        def queue(pipe: Pipeline | ClusterPipeline) -> None:
            self._queue_songs(pipe, prepared)
            pipe.zadd(feed_key, members)

        self._write(queue, list(members), [feed_key])
        self._log_changes(members)

    def write_feed_entries(
        self,
        songs: Sequence[SongRecord],
        entries: FeedEntries,
        ages: FeedEntries | None = None,
    ) -> None:
        """HSET ``songs`` (may be empty), then per feed ZADD the scored members and ZREM the
        ones mapped to None, in one pipelined round trip; everything is validated first.

        ``ages`` holds created_at (epoch seconds) for feeds with an age limit, in the same shape.
        """
        for song in songs:
            if not math.isfinite(song.rank_score):
                raise ValueError(f"song {song.song_id!r}: rank_score must be finite, got {song.rank_score}")
        prepared = [(self.song_key(song.song_id), song_fields(song)) for song in songs]
        ops: list[tuple[str, dict[str, float], list[str]]] = []
        for groups in (entries, ages or {}):
            for feed, members in groups.items():
                key = self.feed_key(feed) if groups is entries else self.age_key(feed)
                add: dict[str, float] = {}
                drop: list[str] = []
                for song_id, value in members.items():
                    check_name("song id", song_id)
                    if value is None:
                        drop.append(song_id)
                    elif not math.isfinite(value):
                        raise ValueError(f"song {song_id!r}: feed {feed!r} score must be finite, got {value}")
                    else:
                        add[song_id] = float(value)
                ops.append((key, add, drop))
        if not prepared and not any(add or drop for _, add, drop in ops):
            return

        def queue(pipe: Pipeline | ClusterPipeline) -> None:
            self._queue_songs(pipe, prepared)
            for key, add, drop in ops:
                if add:
                    pipe.zadd(key, add)
                if drop:
                    pipe.zrem(key, *drop)

        written = dict.fromkeys(song.song_id for song in songs)
        for _, add, _ in ops:
            written.update(dict.fromkeys(add))
        self._write(queue, list(written), [key for key, add, _ in ops if add])
        touched = dict.fromkeys(song.song_id for song in songs)
        for members in entries.values():
            touched.update(dict.fromkeys(members))
        self._log_changes(touched)

    def _queue_songs(self, pipe: Pipeline | ClusterPipeline, prepared: Sequence[tuple[str, dict[str, str]]]) -> None:
        """Queue one :data:`WRITE_SONG` call per song hash (EVALSHA: the pipeline's own script loading
        would cost a round trip per write)."""
        prefixes = list(MODEL_OPTIONAL_PREFIXES)
        for key, fields in prepared:
            lacking = [name for name in MODEL_OPTIONAL_FIELDS if name not in fields]
            pairs = [item for field in fields.items() for item in field]
            pipe.evalsha(self._write_song_sha, 1, key, len(lacking), *lacking, len(prefixes), *prefixes, *pairs)

    def _write(
        self, queue: Callable[[Pipeline | ClusterPipeline], None], song_ids: list[str], zset_keys: list[str]
    ) -> None:
        """Run the write ``queue`` puts in a pipeline, undone for tombstoned songs
        (:func:`indexes.redis_tombstones.write_unless_tombstoned`).

        A node that lacks the song-write script answers NOSCRIPT (those calls never ran): the script is
        loaded on every master and the whole write, idempotent, is sent again.
        """
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            queue(pipe)
            try:
                tombstones.write_unless_tombstoned(self, pipe, song_ids, zset_keys)
                return
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._redis.script_load(WRITE_SONG)

    def claim_calibration(self, priors: Mapping[str, float]) -> tuple[float, float]:
        """Fold these songs' current plays and likes into the calibration totals.

        ``priors`` maps song id -> prior like rate. Each song's share (likes, plays x
        prior) is claimed atomically in its own hash, then the changes are added to the
        totals. Returns the new (likes, expected) totals. On a single node this is one
        script call, atomic as a whole. On Redis Cluster each song is claimed by its own
        script call (one slot each), then the totals are incremented: a crash between the
        two steps loses that batch's change (the totals run low), it never counts twice.
        """
        ids = list(priors)
        if not ids:
            return self.calibration_totals()
        args = [repr(float(priors[song_id])) for song_id in ids]
        if self.multi_key_scripts:
            try:
                out = self._claim_many(keys=[*(self.song_key(s) for s in ids), self.calibration_key()], args=args)
                return totals(out)
            except redis.exceptions.ResponseError as exc:
                if not cross_slot(exc):
                    raise
                self.multi_key_scripts = False
        deltas = run_script_calls(
            self._redis, self._claim, [([self.song_key(s)], [p]) for s, p in zip(ids, args, strict=True)]
        )
        d_likes = sum(float(d[0]) for d in deltas)
        d_expected = sum(float(d[1]) for d in deltas)
        if d_likes or d_expected:
            pipe = self._redis.pipeline(transaction=False)
            for name, delta in zip(CALIBRATION_FIELDS, (d_likes, d_expected), strict=True):
                pipe.hincrbyfloat(self.calibration_key(), name, delta)
            pipe.execute()
        return self.calibration_totals()

    def delete_songs(self, song_ids: Sequence[str], reason: str, feeds: Sequence[str]) -> list[Deletion]:
        """Tombstone, delete and unfeed songs (:func:`indexes.redis_tombstones.delete_songs`)."""
        return tombstones.delete_songs(self, song_ids, reason, feeds)

    def deleted(self, song_ids: Sequence[str]) -> set[str]:
        return set(redis_gone.gone(self, song_ids, expired=False).deleted)

    def gone(self, song_ids: Sequence[str]) -> Gone:
        """Tombstones and expiries of ``song_ids`` in one pipelined round trip (:mod:`indexes.redis_gone`)."""
        return redis_gone.gone(self, song_ids)

    def expire_songs(
        self, song_ids: Sequence[str], feeds: Sequence[str], expired_at: float, history_s: float | None = None
    ) -> int:
        """Shrink and unfeed songs past retention (:func:`indexes.redis_retention.expire_songs`)."""
        return retention.expire_songs(self, song_ids, feeds, expired_at, history_s)

    def expired(self, song_ids: Sequence[str]) -> set[str]:
        return set(redis_gone.gone(self, song_ids, deleted=False).expired)

    def calibration_totals(self) -> tuple[float, float]:
        """(observed likes, predicted likes) over every song with plays."""
        return totals(self._redis.hmget(self.calibration_key(), list(CALIBRATION_FIELDS)))

    def generator_calibration(self) -> dict[str, float]:
        return factors(self._redis.hgetall(self.keys.generator_calibration()))

    def set_generator_calibration(self, values: Mapping[str, float]) -> None:
        key = self.keys.generator_calibration()
        pipe = self._redis.pipeline(transaction=True)  # one key: a cluster slot of its own, still atomic
        pipe.delete(key)
        if values:
            pipe.hset(key, mapping={g: repr(float(f)) for g, f in values.items()})
        pipe.execute()

    def trim_feed(self, feed: str, created_before: float) -> int:
        """Remove songs created before ``created_before`` (epoch s) from an age-limited feed."""
        age_key = self.age_key(feed)
        old = [str(m) for m in self._redis.zrangebyscore(age_key, "-inf", f"({created_before!r}")]
        if not old:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self.feed_key(feed), *old)
        pipe.zrem(age_key, *old)
        pipe.execute()
        self._log_changes(old)  # the songs that left: a follower re-reads those, not the whole feed
        return len(old)

    def replace_feed(self, feed: str, members: Mapping[str, float], ages: Mapping[str, float] | None = None) -> None:
        """Atomically replace a feed (and its age index) with ``members``: built under a
        temporary key in the feed's slot (one transaction), then renamed over it by one script
        call (a cluster pipeline cannot RENAME; the script is atomic on one node and on a cluster)."""
        for song_id, value in members.items():
            check_name("song id", song_id)
            if not math.isfinite(value):
                raise ValueError(f"song {song_id!r}: feed {feed!r} score must be finite, got {value}")
        pairs = [(self.feed_key(feed), members)]
        if ages is not None:
            pairs.append((self.age_key(feed), ages))
        pipe = self._redis.pipeline(transaction=True)
        swap_keys: list[str] = []
        filled: list[str] = []
        for key, values in pairs:
            tmp = self.keys.rebuild(key)
            pipe.delete(tmp)
            items = list(values.items())
            for i in range(0, len(items), 10_000):
                pipe.zadd(tmp, dict(items[i : i + 10_000]))
            swap_keys += (tmp, key)
            filled.append("1" if items else "0")
        pipe.execute()
        self._swap(keys=swap_keys, args=filled)
        self._log_changes((), feeds=(feed,))

    #: Song ids per change log entry: a large batch is logged as several entries.
    CHANGE_BATCH = 1000

    def _log_changes(self, song_ids: Iterable[str], feeds: Sequence[str] = ()) -> None:
        """Append what a write touched to the change log, after the write (its own round trip, so
        that on Redis Cluster too an entry is never visible before the write it describes).

        If this fails after the write succeeded, the caller's retry writes and logs again (the
        worker and the feedback consumer commit their offsets only after both).
        """
        ids = list(song_ids)
        if not ids and not feeds:
            return
        key = self.keys.changes()
        # Entries older than the retention go (approximately: whole stream nodes at a time). The
        # cut-off uses this machine's clock against ids Redis stamps with its own: seconds of skew
        # against minutes of retention.
        oldest = f"{int((time.time() - self.config.changes_retention_s) * 1000)}-0"
        pipe = self._redis.pipeline(transaction=False)
        for i in range(0, max(len(ids), 1), self.CHANGE_BATCH):
            entry = {CHANGE_IDS: ",".join(ids[i : i + self.CHANGE_BATCH])}
            if feeds and i == 0:
                entry[CHANGE_FEEDS] = ",".join(feeds)
            pipe.xadd(key, entry, minid=oldest, approximate=True)  # type: ignore[arg-type]
        pipe.execute()

    def scan_song_ids(self, batch: int = 1000) -> Iterator[str]:
        """Every song id with a hash (SCAN, of every master on a cluster: no blocking; a song written
        meanwhile may be missed)."""
        for key in self._redis.scan_iter(match=self.keys.song_pattern(), count=batch):
            song_id = self.keys.song_id_of(key)
            if song_id is not None:
                yield song_id

    # -- reads --------------------------------------------------------------------------
    def read_fields(self, song_ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]:
        """HMGET ``fields`` of many songs in one round trip (missing values are None).

        One read-only script call on a single node; a pipeline of HMGETs on Redis Cluster.
        """
        if not song_ids:
            return []
        read = FieldsRead(self.keys, song_ids, fields)
        if self.multi_key_scripts:
            try:
                return read.replies(self._hmget_many(keys=read.keys, args=read.fields))
            except redis.exceptions.ResponseError as exc:
                if not cross_slot(exc):
                    raise
                self.multi_key_scripts = False
        return read.replies(read.queue(self._redis.pipeline(transaction=False)).execute())

    def read_songs(self, song_ids: Sequence[str], fields: Sequence[str] | None = None) -> list[StoredSong | None]:
        """Many songs' records parsed (:func:`~indexes.redis_schema.parse_song`), in one round trip:
        a pipeline of HGETALLs, or of HMGETs of ``fields`` (no script: any number of songs, on
        Redis Cluster too, without holding the server)."""
        pipe = self._redis.pipeline(transaction=False)
        names = None if fields is None else list(fields)
        for song_id in song_ids:
            if names is None:
                pipe.hgetall(self.song_key(song_id))
            else:
                pipe.hmget(self.song_key(song_id), names)
        out: list[StoredSong | None] = []
        for song_id, raw in zip(song_ids, pipe.execute() if song_ids else [], strict=True):
            values = raw if names is None else dict(zip(names, raw, strict=True))
            out.append(parse_song(song_id, {str(k): None if v is None else str(v) for k, v in values.items()}))
        return out

    def feed_window(self, feed: str, max_score: float | None, count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (song_id, score) pairs with score <= ``max_score`` (inclusive), best first."""
        return pairs(self._redis.zrange(**window_query(self.feed_key(feed), max_score, count)))

    def async_reads(self) -> AsyncScoreReads:
        """An asyncio client for the read path (create it inside the event loop that uses it)."""
        return AsyncStoreReads(self)

    def get_song(self, song_id: str) -> dict[str, str] | None:
        return as_record(self._redis.hgetall(self.song_key(song_id)))

    def get_songs(self, song_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """HGETALL of many songs, pipelined (one round trip; works on Redis Cluster too)."""
        pipe = self._redis.pipeline(transaction=False)
        for song_id in song_ids:
            pipe.hgetall(self.song_key(song_id))
        return [as_record(raw) for raw in pipe.execute()]

    def feed_page(self, feed: str, start: int, count: int) -> list[tuple[str, float]]:
        """(song_id, rank_score) pairs, best first, from rank ``start`` (0-based)."""
        if start < 0:
            raise ValueError("start must be >= 0")
        if count <= 0:
            return []
        return pairs(self._redis.zrevrange(self.feed_key(feed), start, start + count - 1, withscores=True))

    def feed_size(self, feed: str) -> int:
        return int(self._redis.zcard(self.feed_key(feed)))

    def ping(self) -> bool:
        """True if Redis answers; False on a connection or timeout error (a health probe never raises)."""
        try:
            return bool(self._redis.ping())
        except UNREACHABLE:
            return False

    def close(self) -> None:
        if "_redis" in self.__dict__:  # never connected: nothing to close
            self._redis.close()

    @property
    def client(self) -> SyncClient:
        """The underlying client (tests and benchmarks that seed or inspect raw keys)."""
        return self._redis
