"""Storage interfaces: one small abstract class per storage concern.

``indexes`` is the bottom layer: it knows nothing of models, Kafka or audio.
Records here are plain data; the ranker and the consumers map their own types
onto them. Backends live one per module and are chosen by URL scheme.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ID_MASK = (1 << 63) - 1


def faiss_id(song_id: str) -> int:
    """Stable positive int64 id of a song in the vector index (FAISS ids are int64): 63 bits of BLAKE2b.

    Not to be confused with a store's key (a Redis key string): this is the song's number in FAISS.
    """
    digest = hashlib.blake2b(song_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _ID_MASK


@dataclass(frozen=True)
class EmbeddingRecord:
    """What the encoder produced for one song: the source of truth for the vector index."""

    song_id: str
    encoder_id: str
    layers: np.ndarray  # (n_layers, dim) float32: pooled layer features, for (re)training heads
    vector: np.ndarray  # (vector_dim,) float32, L2-normalised: what the similarity index holds
    n_segments: int
    n_frames: int


@dataclass(frozen=True)
class StoredEmbedding:
    """An embedding as read back from the store, with its insertion sequence number."""

    seq: int
    key: int  # the song's faiss_id
    record: EmbeddingRecord


@dataclass(frozen=True)
class SongRecord:
    """A scored song as the score store keeps it (one Redis hash per song)."""

    song_id: str
    model_version: str
    scores: dict[str, float]
    rank_score: float
    generator: str
    created_at: str  # RFC 3339
    scored_at: str  # RFC 3339
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredSong:
    """A song as read back from the score store, typed; None (or empty) where the hash lacks a field.

    Values that do not parse (a damaged or foreign hash) read as absent: a score is left
    out of ``scores``, ``rank_score`` or ``prior_like_rate`` is None, a counter is 0.
    Timestamps stay the RFC 3339 strings they were written as. ``fields`` is every field
    read, as stored (strings), for anything else a caller needs (tags, duration_s, ...).
    """

    song_id: str
    model_version: str | None = None
    rank_score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    generator: str | None = None
    created_at: str | None = None
    scored_at: str | None = None
    truncated: bool = False
    prior_like_rate: float | None = None
    counters: dict[str, int] = field(default_factory=dict)  # engagement: plays, likes, ... (0 when absent)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One entry of a score store's change log: what a write batch touched, and when.

    ``song_ids``: songs whose record or feed entries were written (read them again to learn
    what they hold now); ``feeds``: feeds replaced or trimmed as a whole. Entries are appended
    after the write they describe, so a reader that sees an entry sees the write.
    """

    position: str  # opaque and ordered: read the changes after it
    at: float  # epoch seconds the store logged it (its own clock)
    song_ids: tuple[str, ...] = ()
    feeds: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemovedEmbedding:
    """A deletion from an embedding store, in sequence order with the upserts: the index drops ``key``."""

    seq: int
    key: int  # the song's faiss_id
    song_id: str


@dataclass(frozen=True)
class Deletion:
    """What :meth:`ScoreStore.delete_songs` did to one song."""

    song_id: str
    had_record: bool  # its hash existed (scores, counters or calibration claims), now gone
    already_deleted: bool  # a tombstone was there already (kept, with its first reason and time)
    feeds: tuple[str, ...] = ()  # the feeds it was removed from


@dataclass(frozen=True)
class Gone:
    """Which of some songs left the store (:meth:`ScoreStore.gone`): taken down, or past retention.

    A song in both counts as deleted: a tombstone is final, an expiry is not.
    """

    deleted: frozenset[str] = frozenset()  # a tombstone
    expired: frozenset[str] = frozenset()  # a record marked expired, and no tombstone

    def __contains__(self, song_id: object) -> bool:
        return song_id in self.deleted or song_id in self.expired


#: A (feed -> song_id -> value) map; None removes the song from that feed.
FeedEntries = Mapping[str, Mapping[str, float | None]]


class EmbeddingStore(ABC):
    """Durable per-song embeddings (pooled layers + index vector); upserts are idempotent."""

    @abstractmethod
    def put_many(self, records: Sequence[EmbeddingRecord]) -> None:
        """Insert or replace, durably (committed and synced) before returning."""

    @abstractmethod
    def get(self, song_id: str) -> StoredEmbedding | None: ...

    @abstractmethod
    def contains(self, song_ids: Sequence[str]) -> set[str]:
        """The subset of ``song_ids`` already stored."""

    @abstractmethod
    def iter_since(self, seq: int, batch_size: int = 4096) -> Iterator[StoredEmbedding]:
        """Records written after sequence number ``seq`` (0 = all), in sequence order."""

    @abstractmethod
    def delete(self, song_ids: Sequence[str]) -> dict[str, int]:
        """Remove these songs' records, durably; ``{song_id: the deletion's seq}`` for those that were stored."""

    @abstractmethod
    def iter_changes_since(self, seq: int, batch_size: int = 4096) -> Iterator[StoredEmbedding | RemovedEmbedding]:
        """Upserts and deletions after ``seq``, in one sequence order: what an index catching up applies."""

    @abstractmethod
    def max_seq(self) -> int: ...

    @abstractmethod
    def count(self) -> int: ...

    # -- retention ------------------------------------------------------------------------
    @abstractmethod
    def older_than(self, before: float, limit: int) -> list[tuple[StoredEmbedding, float]]:
        """Up to ``limit`` records last written before ``before`` (epoch s), oldest first, each with
        when it was written."""

    @abstractmethod
    def prune_deletions(self, deleted_before: float, through_seq: int) -> int:
        """Forget deletions older than ``deleted_before`` with seq <= ``through_seq``; how many."""

    @abstractmethod
    def deletions_pruned_through(self) -> int:
        """The last forgotten deletion's seq (0: none): an index behind it rebuilds from the store."""

    @abstractmethod
    def close(self) -> None: ...


class VectorIndex(ABC):
    """Nearest-neighbour search over song vectors keyed by :func:`faiss_id`."""

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @abstractmethod
    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under int64 keys, replacing any existing vector with the same key."""

    @abstractmethod
    def remove(self, keys: np.ndarray) -> int: ...

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search: (similarities, keys), each (n, k); missing slots have key -1."""

    @abstractmethod
    def keys(self) -> np.ndarray:
        """Every key in the index (int64)."""

    @abstractmethod
    def reconstruct(self, key: int) -> np.ndarray | None: ...

    def reconstruct_many(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """The stored vectors of these keys (absent keys are left out); backends batch it."""
        out: dict[int, np.ndarray] = {}
        for key in keys.tolist():
            vec = self.reconstruct(key)
            if vec is not None:
                out[key] = vec
        return out

    def reconstruct_matrix(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of these keys as (found mask, float32 matrix in ``keys``' order, zero rows
        where absent; ``(n, 0)`` when none is found). A serving page reads a block of some hundred
        vectors this way; backends that can answer with one array skip the per-key dict."""
        return as_matrix(keys, self.reconstruct_many(keys))


class AsyncScoreReads(ABC):
    """The read path of a :class:`ScoreStore` on asyncio (the API's event loop).

    Same results as the synchronous methods of the same names. Create it inside the
    event loop that uses it (:meth:`ScoreStore.async_reads`) and close it there.
    """

    @abstractmethod
    async def feed_window(self, feed: str, max_score: float | None, count: int) -> list[tuple[str, float]]: ...

    @abstractmethod
    async def read_fields(self, song_ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]: ...

    @abstractmethod
    async def get_song(self, song_id: str) -> dict[str, str] | None: ...

    @abstractmethod
    async def feed_size(self, feed: str) -> int: ...

    @abstractmethod
    async def calibration_totals(self) -> tuple[float, float]: ...

    @abstractmethod
    async def generator_calibration(self) -> dict[str, float]:
        """Each generator's factor on the calibration scale (:meth:`ScoreStore.generator_calibration`)."""

    # -- what an in-memory copy needs: a full read, then the change log ------------------------
    @abstractmethod
    def scan_song_ids(self, batch: int = 1000) -> AsyncIterator[list[str]]:
        """Every song id with a record, in batches (non-blocking; a song written meanwhile may be missed)."""

    @abstractmethod
    def scan_feed(self, feed: str, batch: int = 10_000) -> AsyncIterator[list[tuple[str, float]]]:
        """Every (song_id, score) of ``feed``, in batches, in no order: every member present for the
        whole scan is returned (perhaps twice, the later with the newer score), whatever moves
        meanwhile. (Ranges by rank would skip a member when another moves across a range's edge.)"""

    @abstractmethod
    async def feed_scores(self, feeds: Sequence[str], song_ids: Sequence[str]) -> dict[str, list[float | None]]:
        """Each feed's score of each song (None: not a member), in one round trip."""

    @abstractmethod
    async def change_position(self) -> str:
        """The newest change's position: reading after it returns only later changes."""

    @abstractmethod
    async def read_changes(self, after: str, count: int, block_s: float) -> list[Change]:
        """Up to ``count`` changes after ``after``, oldest first; waits up to ``block_s`` for one."""

    @abstractmethod
    async def changes_lost(self, after: str) -> bool:
        """Whether changes after ``after`` may be gone (the log was trimmed past it, or reset):
        a copy that followed the log from there must be read again whole."""

    @abstractmethod
    async def ping(self) -> bool: ...

    @abstractmethod
    async def close(self) -> None: ...


class ScoreStore(ABC):
    """Per-song records (one field map per song: scores, metadata, engagement counters) and the
    feeds (songs sorted by a stored score), with the calibration totals behind the like-rate prior.

    Field names are those of :mod:`indexes.redis_schema`. Writes merge fields and are
    idempotent; everything a batch write is given is validated before anything is sent.
    """

    @property
    @abstractmethod
    def namespace(self) -> str:
        """What names this store's data (the key prefix): two stores with the same namespace share it."""

    # -- writes ---------------------------------------------------------------------------
    @abstractmethod
    def write_songs(self, songs: Sequence[SongRecord], feed: str) -> None:
        """Write records and their entries in ``feed`` (scored by ``rank_score``) in one round trip."""

    @abstractmethod
    def write_feed_entries(
        self, songs: Sequence[SongRecord], entries: FeedEntries, ages: FeedEntries | None = None
    ) -> None:
        """Write ``songs`` (may be empty), then per feed add the scored members and remove the
        ones mapped to None, in one round trip. ``ages`` holds created_at (epoch s) for feeds
        with an age limit, in the same shape."""

    @abstractmethod
    def claim_calibration(self, priors: Mapping[str, float]) -> tuple[float, float]:
        """Fold these songs' (song id -> prior like rate) plays and likes into the calibration
        totals, never counting a song twice; the new (likes, expected likes) totals."""

    @abstractmethod
    def calibration_totals(self) -> tuple[float, float]:
        """(observed likes, predicted likes) over every song with plays."""

    @abstractmethod
    def generator_calibration(self) -> dict[str, float]:
        """Each generator's factor on the calibration scale (none stored: empty, every factor 1)."""

    @abstractmethod
    def set_generator_calibration(self, values: Mapping[str, float]) -> None:
        """Replace every generator's factor at once (``apexrank retrain``'s fit)."""

    @abstractmethod
    def trim_feed(self, feed: str, created_before: float) -> int:
        """Remove songs created before ``created_before`` (epoch s) from an age-limited feed; how many."""

    @abstractmethod
    def replace_feed(self, feed: str, members: Mapping[str, float], ages: Mapping[str, float] | None = None) -> None:
        """Atomically replace a feed (and its age index) with ``members``."""

    # -- takedown -------------------------------------------------------------------------
    @abstractmethod
    def delete_songs(self, song_ids: Sequence[str], reason: str, feeds: Sequence[str]) -> list[Deletion]:
        """Take songs down: tombstone each (kept for the store's tombstone retention), delete its
        record (scores, counters, calibration claims, whose share leaves the calibration totals),
        remove it from ``feeds`` and their age indexes, and log the change. Idempotent; a song
        never stored is tombstoned all the same (it stays out if it arrives later).

        Writes racing a deletion never bring a song back: :meth:`write_songs` and
        :meth:`write_feed_entries` skip tombstoned songs."""

    @abstractmethod
    def deleted(self, song_ids: Sequence[str]) -> set[str]:
        """The subset of ``song_ids`` with a tombstone, in one round trip (:meth:`gone`'s first question alone)."""

    @abstractmethod
    def gone(self, song_ids: Sequence[str]) -> Gone:
        """Which of ``song_ids`` were taken down and which expired, in one round trip: what a
        caller that must not bring either back (a replayed event) asks before writing."""

    # -- retention ------------------------------------------------------------------------
    @abstractmethod
    def expire_songs(
        self, song_ids: Sequence[str], feeds: Sequence[str], expired_at: float, history_s: float | None = None
    ) -> int:
        """Take songs past the retention window off the hot path: remove them from ``feeds`` and
        their age indexes, shrink each record to what the engagement history needs (counters,
        calibration claims, generator, creation time, model and prior; no scores, so no rankable
        song) marked ``expired_at`` (epoch s), and log the change. With ``history_s`` the shrunk
        record itself goes that long after its first expiry (None: kept). Idempotent; a song with
        no record is left alone. How many records were shrunk."""

    @abstractmethod
    def expired(self, song_ids: Sequence[str]) -> set[str]:
        """The subset of ``song_ids`` whose record says it expired, in one round trip (:meth:`gone`'s
        second question alone: a song with a tombstone too is in it)."""

    # -- reads ----------------------------------------------------------------------------
    @abstractmethod
    def scan_song_ids(self, batch: int = 1000) -> Iterator[str]:
        """Every song id with a record (without blocking the store; a song written meanwhile may be missed)."""

    @abstractmethod
    def read_fields(self, song_ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]:
        """``fields`` of many songs in one round trip, in order (missing values are None)."""

    @abstractmethod
    def read_songs(self, song_ids: Sequence[str], fields: Sequence[str] | None = None) -> list[StoredSong | None]:
        """Many songs' records, parsed, in one round trip, in order; None for a song with no record.

        ``fields`` reads only those fields (the rest of the record is then empty or None),
        and a song none of whose ``fields`` is stored reads as None.
        """

    @abstractmethod
    def feed_window(self, feed: str, max_score: float | None, count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (song_id, score) pairs with score <= ``max_score`` (inclusive), best first."""

    @abstractmethod
    def feed_page(self, feed: str, start: int, count: int) -> list[tuple[str, float]]:
        """(song_id, score) pairs, best first, from rank ``start`` (0-based)."""

    @abstractmethod
    def feed_size(self, feed: str) -> int: ...

    @abstractmethod
    def get_song(self, song_id: str) -> dict[str, str] | None:
        """A song's record as stored (strings), or None."""

    def get_songs(self, song_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """:meth:`get_song` of many songs, in order; backends override it with one round trip."""
        return [self.get_song(song_id) for song_id in song_ids]

    @abstractmethod
    def async_reads(self) -> AsyncScoreReads:
        """The read path on asyncio (create it inside the event loop that uses it)."""

    # -- lifecycle ------------------------------------------------------------------------
    @abstractmethod
    def ping(self) -> bool:
        """True if the store answers; False when it is unreachable (a health probe never raises)."""

    @abstractmethod
    def close(self) -> None: ...


#: Per-event statuses returned by :meth:`EngagementCounters.count`: counted now; counted
#: earlier by this very message (a replayed batch); counted earlier by another message;
#: not counted because the song was taken down (it has a tombstone).
NEW, REPLAY, DUPLICATE, TOMBSTONED = "n", "r", "d", "x"


def message_marker(partition: int, offset: int) -> str:
    """The dedup value naming a Kafka message: ``(partition + 1) * 2**44 + offset`` in decimal.

    An integer, which Redis keeps inside the key's object (about 24 bytes less per key than
    the string ``"<partition>:<offset>"``); unique while offsets stay below 2**44 and
    partitions below 2**19 - 1, and never ``"1"``, the value older versions wrote.
    """
    return str((partition + 1) << 44 | offset)


class EngagementCounters(ABC):
    """Per-song engagement counters (plays, likes, ...) with event-id deduplication."""

    @abstractmethod
    def count(
        self,
        song_ids: Sequence[str],
        event_ids: Sequence[str],
        types: Sequence[str],
        markers: Sequence[str],
        updated_at: str,
        positions: Sequence[int | None] | None = None,
    ) -> str:
        """Count the events not seen within the dedup window; one status per event, in input order.

        Event ``i`` is ``event_ids[i]`` for ``song_ids[i]``, of ``types[i]`` (play, like, ...),
        carried by the message ``markers[i]`` (:func:`message_marker`), shown at page position
        ``positions[i]`` (None, or no ``positions``: unknown). A new play also adds its position's
        examination weight (:meth:`examination`; 1 for an unknown position) to the song's examined
        plays, in the same atomic step. Returns a string of :data:`NEW`, :data:`REPLAY`,
        :data:`DUPLICATE` or :data:`TOMBSTONED`, one per event.
        """

    @abstractmethod
    def counts(self, song_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Each song's counters (0 where none)."""

    @abstractmethod
    def examined_plays(self, song_ids: Iterable[str]) -> dict[str, float]:
        """Each song's examined plays (its plays where none were counted with weights yet; 0 for no plays)."""

    @abstractmethod
    def examination(self) -> list[float] | None:
        """The stored examination weight of each page position (deeper positions share the last); None: none
        stored (every play counts 1)."""

    @abstractmethod
    def set_examination(self, weights: Sequence[float]) -> None:
        """Store the examination weights (positive, finite; position 0 first) for counting to use."""

    @abstractmethod
    def close(self) -> None: ...


def as_matrix(keys: np.ndarray, found: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``reconstruct_many``'s answer as (found mask, matrix in ``keys``' order, zero rows where absent)."""
    if not found:
        return np.zeros(len(keys), np.bool_), np.zeros((len(keys), 0), np.float32)
    if len(found) == len(keys):  # the usual case: every key indexed, already in order
        return np.ones(len(keys), np.bool_), np.array(list(found.values()), dtype=np.float32)
    mask = np.fromiter((k in found for k in keys.tolist()), np.bool_, len(keys))
    matrix = np.zeros((len(keys), len(next(iter(found.values())))), np.float32)
    matrix[mask] = np.array([found[k] for k in keys[mask].tolist()], dtype=np.float32)
    return mask, matrix
