"""The API's in-memory song table: every scored song as numpy columns, and each feed's order.

A feed page or a rerank reads rows of this table instead of the store, so the request path
makes no round trip and parses nothing. :mod:`ranker.serving.table_sync` loads it from the
score store at start-up and keeps it current from the store's change log; the store stays
the source of truth and what processes and nodes share. Values are parsed exactly as a
read of the hash fields parses them (:meth:`SongBatch.from_fields
<ranker.serving.batch.SongBatch.from_fields>`), so a page from the table is the page the
store's fields give.

Memory per song (measured in docs/benchmarks-api.md): the columns (about 110 bytes), the id
and its row in a dict, the tags string (shared between songs with the same tags), and per
feed one entry in a sorted list and a dict. Vectors stay in the FAISS index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from sortedcontainers import SortedList

from indexes.base import faiss_id
from ranker.events import TASKS
from ranker.serving.batch import SongBatch

#: Above every song id (ids are ASCII: indexes.redis_schema.check_name), to bisect past a score's ties.
_TOP = "\U0010ffff"


class FeedOrder:
    """One feed's members in the store's order: ZRANGE REV is score descending, then id descending.

    The members are kept as ``(score, song_id)`` in ascending order and walked backwards.
    """

    __slots__ = ("_keys", "_score")

    def __init__(self, pairs: Iterable[tuple[str, float]] = ()) -> None:
        self._score: dict[str, float] = dict(pairs)
        self._keys: SortedList = SortedList((score, song_id) for song_id, score in self._score.items())

    def __len__(self) -> int:
        return len(self._score)

    def get(self, song_id: str) -> float | None:
        return self._score.get(song_id)

    def set(self, song_id: str, score: float | None) -> None:
        """Place a song at ``score``; None removes it."""
        old = self._score.get(song_id)
        if old == score:
            return
        if old is not None:
            self._keys.remove((old, song_id))
        if score is None:
            del self._score[song_id]
            return
        self._score[song_id] = score
        self._keys.add((score, song_id))

    def window(self, max_score: float | None, count: int) -> list[tuple[str, float]]:
        """What ``ZRANGE feed max_score -inf BYSCORE REV LIMIT 0 count WITHSCORES`` answers:
        up to ``count`` (song_id, score) pairs with score <= ``max_score`` (None: any), best first."""
        keys = self._keys
        top = max_score is None or max_score == math.inf
        end = len(keys) if top else keys.bisect_right((max_score, _TOP))
        start = max(0, end - count)
        return [(song_id, score) for score, song_id in keys.islice(start, end, reverse=True)]

    def after(self, score: float, song_id: str, count: int) -> list[tuple[str, float]]:
        """Up to ``count`` pairs strictly after ``(score, song_id)`` in the feed's order, best first."""
        keys = self._keys
        end = keys.bisect_left((score, song_id))
        return [(sid, sc) for sc, sid in keys.islice(max(0, end - count), end, reverse=True)]

    def items(self) -> list[tuple[str, float]]:
        """Every (song_id, score), best first."""
        return [(song_id, score) for score, song_id in reversed(self._keys)]


class SongTable:
    """Scored songs as columns (one row per song), and each feed's order.

    Only scored songs have rows (a hash with engagement alone is not a song to rank); a
    feed's order holds whatever the store's sorted set holds. Rows of removed songs are
    reused. The API's event loop is the only writer and reader, so nothing is locked.
    """

    def __init__(self, feeds: Iterable[str], capacity: int = 1024) -> None:
        capacity = max(1, capacity)
        self.row_of: dict[str, int] = {}
        self.ids: list[str | None] = [None] * capacity
        self._free: list[int] = []
        self._end = 0  # rows [0, _end) have been used
        self.scores = np.full((capacity, len(TASKS)), np.nan)
        self.model_rate = np.full(capacity, np.nan)
        self.plays = np.zeros(capacity)
        self.likes = np.zeros(capacity)
        self.created_ts = np.zeros(capacity)  # not capped at any clock: reads cap it at their now
        self.duration_s = np.full(capacity, np.nan)
        self.generator = np.zeros(capacity, np.int32)
        self.key = np.zeros(capacity, np.int64)  # faiss_id: the song's number in the vector index and in cursors
        self.generator_names: list[str] = []
        self._generator_code: dict[str, int] = {}
        self.model = np.full(capacity, -1, np.int32)  # code of the model version that scored the song; -1: no row
        self.untrained = np.zeros(capacity, np.bool_)  # scored by an untrained, seeded head
        self.model_names: list[str] = []
        self._model_code: dict[str, int] = {}
        self.raw_tags: list[str | None] = [None] * capacity
        self._tags: dict[str, str] = {}  # one string object per distinct value
        self.feeds: dict[str, FeedOrder] = {name: FeedOrder() for name in feeds}

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, song_id: object) -> bool:
        return song_id in self.row_of

    @property
    def capacity(self) -> int:
        return len(self.ids)

    # -- writes -------------------------------------------------------------------------------------
    def upsert(self, batch: SongBatch) -> None:
        """Write the batch's scored songs (parsed with no ``now``) and remove its unscored ones."""
        if batch.raw_tags is None or batch.duration_s is None or batch.model_versions is None:
            raise ValueError("the table is written from TABLE_FIELDS rows (tags, duration and model included)")
        assert batch.untrained is not None
        scored = batch.scored.tolist()
        rows = np.fromiter(
            (self._row(sid) if ok else -1 for sid, ok in zip(batch.song_ids, scored, strict=True)),
            np.intp,
            len(batch),
        )
        self.remove([sid for sid, ok in zip(batch.song_ids, scored, strict=True) if not ok])
        keep = rows >= 0
        target, src = rows[keep], np.flatnonzero(keep)
        self.scores[target] = batch.scores[src]
        self.model_rate[target] = batch.model_rate[src]
        self.plays[target] = batch.plays[src]
        self.likes[target] = batch.likes[src]
        self.created_ts[target] = batch.created_ts[src]
        self.duration_s[target] = batch.duration_s[src]
        self.untrained[target] = batch.untrained[src]
        for row, j in zip(target.tolist(), src.tolist(), strict=True):
            self.generator[row] = _code(batch.generators[j], self._generator_code, self.generator_names)
            self.model[row] = _code(batch.model_versions[j], self._model_code, self.model_names)
            tags = batch.raw_tags[j]
            self.raw_tags[row] = None if tags is None else self._tags.setdefault(tags, tags)

    def remove(self, song_ids: Iterable[str]) -> int:
        """Drop these songs' rows (their feed entries are the feed orders' business); how many had one."""
        dropped = 0
        for song_id in song_ids:
            row = self.row_of.pop(song_id, None)
            if row is None:
                continue
            self.ids[row] = None
            self.raw_tags[row] = None
            self.model[row] = -1
            self._free.append(row)
            dropped += 1
        return dropped

    def set_feed(self, feed: str, order: FeedOrder) -> None:
        """Replace a feed's order whole."""
        self.feeds[feed] = order

    def shared_id(self, song_id: str) -> str:
        """The table's own string for this id when it has a row (a feed then holds no copy of it)."""
        row = self.row_of.get(song_id)
        return song_id if row is None else self.ids[row] or song_id

    def _row(self, song_id: str) -> int:
        row = self.row_of.get(song_id)
        if row is not None:
            return row
        if self._free:
            row = self._free.pop()
        else:
            if self._end == self.capacity:
                self._grow(self.capacity + max(1024, self.capacity // 2))  # 1.5x: a copy costs 2.5x at most
            row = self._end
            self._end += 1
        self.row_of[song_id] = row
        self.ids[row] = song_id
        self.key[row] = faiss_id(song_id)
        return row

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.ids.extend([None] * extra)
        self.raw_tags.extend([None] * extra)
        for name, fill in (
            ("scores", np.nan),
            ("model_rate", np.nan),
            ("plays", 0.0),
            ("likes", 0.0),
            ("created_ts", 0.0),
            ("duration_s", np.nan),
            ("generator", 0),
            ("key", 0),
            ("model", -1),
            ("untrained", False),
        ):
            old: np.ndarray = getattr(self, name)
            new = np.full((capacity, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    # -- reads --------------------------------------------------------------------------------------
    def rows(self, song_ids: Sequence[str]) -> np.ndarray:
        """Each song's row, -1 where it has none (not scored, or unknown)."""
        get = self.row_of.get
        return np.fromiter((get(s, -1) for s in song_ids), np.intp, len(song_ids))

    def batch(self, rows: np.ndarray, now: float | None = None, *, filters: bool = False) -> SongBatch:
        """These rows as a :class:`SongBatch` (copies: later writes do not change it).

        ``now`` caps the creation times as a read at ``now`` does; ``filters`` adds the tags
        and durations (what ``Policy.admits`` reads).
        """
        ids = self.ids
        created = self.created_ts[rows]
        if now is not None:
            created = np.where(created > now, now, created)
        names = self.generator_names
        out = SongBatch(
            song_ids=[ids[r] or "" for r in rows.tolist()],
            scores=self.scores[rows],
            scored=np.ones(len(rows), np.bool_),
            model_rate=self.model_rate[rows],
            plays=self.plays[rows],
            likes=self.likes[rows],
            created_ts=created,
            generators=[names[c] for c in self.generator[rows].tolist()],
            untrained=self.untrained[rows],
        )
        if filters:
            out.raw_tags = [self.raw_tags[r] for r in rows.tolist()]
            out.duration_s = self.duration_s[rows]
        return out

    def models(self) -> dict[str, tuple[int, int]]:
        """Each model version among the table's songs: (songs, of which scored by an untrained head)."""
        live = self.model[: self._end]
        present = live >= 0
        codes = live[present]
        songs = np.bincount(codes, minlength=len(self.model_names))
        untrained = np.bincount(codes[self.untrained[: self._end][present]], minlength=len(self.model_names))
        return {
            name: (int(n), int(u))
            for name, n, u in zip(self.model_names, songs.tolist(), untrained.tolist(), strict=True)
            if n
        }

    def nbytes(self) -> int:
        """The bytes of the numpy columns (the Python objects beside them are measured by the benchmark)."""
        arrays = (
            self.scores,
            self.model_rate,
            self.plays,
            self.likes,
            self.created_ts,
            self.duration_s,
            self.generator,
            self.key,
            self.model,
            self.untrained,
        )
        return int(sum(a.nbytes for a in arrays))


def _code(name: str, codes: dict[str, int], names: list[str]) -> int:
    """``name``'s number in an interned column (a new name gets the next one)."""
    code = codes.get(name)
    if code is None:
        code = codes[name] = len(names)
        names.append(name)
    return code
