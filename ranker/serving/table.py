"""The API's in-memory song table: every scored song as numpy columns, and each feed's order.

A feed page or a rerank reads rows of this table instead of the store, so the request path
makes no round trip and parses nothing. :mod:`ranker.serving.table_sync` loads it from the
score store at start-up and keeps it current from the store's change log; the store stays
the source of truth and what processes and nodes share. Values are parsed exactly as a
read of the hash fields parses them (:meth:`SongBatch.from_fields
<ranker.serving.batch.SongBatch.from_fields>`), so a page from the table is the page the
store's fields give.

Memory per song (measured in docs/benchmarks-api.md): the columns (about 115 bytes), the id
and its row in a dict, the tags string (shared between songs with the same tags) and its tag-set
code (request-time tag filters read it), and per feed one entry in a sorted list and a dict.
Vectors stay in the FAISS index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
from sortedcontainers import SortedList

from indexes.base import faiss_id
from ranker.events import TASKS
from ranker.serving.batch import SongBatch, in_age_window
from ranker.serving.cursor import Cursor, _after, skip_key
from ranker.serving.policy import Policy, parse_tags, tags_match

if TYPE_CHECKING:
    from ranker.serving.filters import RequestFilters

#: Tag filters whose per-tag-set answers the table keeps (:meth:`SongTable.tag_mask`).
_TAG_MASKS = 256
#: Tag sets the table may hold beyond twice its songs before it drops those no row has (each new
#: free-form tags value is a set, and a removed song's stays until then).
_TAG_SLACK = 1024
#: The same for generator names and model versions (free text from the events, interned per row).
_NAME_SLACK = 1024
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
        return [(song_id, score) for score, song_id in self.window_keys(max_score, count)]

    def after(self, score: float, song_id: str, count: int) -> list[tuple[str, float]]:
        """Up to ``count`` pairs strictly after ``(score, song_id)`` in the feed's order, best first."""
        return [(sid, sc) for sc, sid in self.after_keys(score, song_id, count)]

    def window_keys(self, max_score: float | None, count: int) -> list[tuple[float, str]]:
        """:meth:`window` as the (score, song_id) keys held (no pair built per song: a page's scan reads these)."""
        keys = self._keys
        top = max_score is None or max_score == math.inf
        end = len(keys) if top else keys.bisect_right((max_score, _TOP))
        return list(keys.islice(max(0, end - count), end, reverse=True))

    def after_keys(self, score: float, song_id: str, count: int) -> list[tuple[float, str]]:
        """:meth:`after` as the (score, song_id) keys held."""
        keys = self._keys
        end = keys.bisect_left((score, song_id))
        return list(keys.islice(max(0, end - count), end, reverse=True))

    def items(self) -> list[tuple[str, float]]:
        """Every (song_id, score), best first."""
        return [(song_id, score) for score, song_id in reversed(self._keys)]


@dataclass
class FeedRange:
    """One range of a feed read by a page's scan (:meth:`FeedReader._window
    <ranker.serving.reader.FeedReader._window>`), masked by all but a listener's heard songs."""

    start: tuple[float, str]
    count: int
    got: list[tuple[float, str]]  # (score, id) as read
    ids: list[str]  # those strictly after ``start``
    scores: list[float]
    at: np.ndarray  # their table rows (-1: unknown)
    keys: np.ndarray  # their faiss ids
    ok: np.ndarray  # known, not skipped, in the age window, passing the request filters
    changes: int  # the table's ``changes`` when read: ``at`` holds only while it is the same

    @classmethod
    def read(
        cls,
        table: SongTable,
        policy: Policy,
        cur: Cursor | None,
        start: tuple[float, str],
        count: int,
        now: float,
        filters: RequestFilters,
        excluded: np.ndarray | None,
    ) -> FeedRange:
        """``count`` rows of the feed from ``start``; ``filters`` without heard songs."""
        order = table.feeds[policy.name]
        start_score, start_id = start
        got = order.window_keys(None if math.isinf(start_score) else start_score, count)  # (score, id)
        if got and not _after(*got[-1], start_score, start_id):
            # More than ``count`` songs tie at the boundary's score: a range by score would
            # return the same rows again and again (the store path stalled here, serving the
            # same cursor for ever). Read on strictly after the boundary instead.
            got = order.after_keys(start_score, start_id, count)
        lead = 0  # rows not strictly after the boundary (its score's ties) lead the range
        while lead < len(got) and not _after(*got[lead], start_score, start_id):
            lead += 1
        scores, ids = ([], []) if lead == len(got) else map(list, zip(*got[lead:], strict=True))
        at = table.rows(ids)
        known = at >= 0
        keys = table.key[np.where(known, at, 0)]
        if not known.all():
            for i in np.flatnonzero(~known).tolist():
                keys[i] = faiss_id(ids[i])
        ok = known
        if cur is not None and cur.skip:
            ok &= ~cur.skips(skip_key(keys))  # type: ignore[arg-type]
        candidates = at[ok]
        created = table.created_ts[candidates]
        passing = in_age_window(policy, np.where(created > now, now, created), now, filters.max_age_s)
        if not filters.empty:
            passing &= filters.mask(table, candidates, excluded)
        ok[ok] = passing
        return cls(start, count, got, ids, scores, at, keys, ok, table.changes)


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
        self.eplays = np.full(capacity, np.nan, np.float32)  # examined plays; NaN: the hash has none
        self.prior_sd = np.full(capacity, np.nan)  # the ensemble's spread of model_rate; NaN: a single head
        self.ood = np.zeros(capacity, np.bool_)  # flagged out of the model's training distribution
        self.likes = np.zeros(capacity)
        self.created_ts = np.zeros(capacity)  # not capped at any clock: reads cap it at their now
        self.duration_s = np.full(capacity, np.nan)
        self.generator = np.zeros(capacity, np.int32)  # code into generator_names; -1: a freed row
        self.key = np.zeros(capacity, np.int64)  # faiss_id: the song's number in the vector index and in cursors
        self.generator_names: list[str] = []
        self._generator_code: dict[str, int] = {}
        self.model = np.full(capacity, -1, np.int32)  # code of the model version that scored the song; -1: no row
        self.untrained = np.zeros(capacity, np.bool_)  # scored by an untrained, seeded head
        self.model_names: list[str] = []
        self._model_code: dict[str, int] = {}
        self.raw_tags: list[str | None] = [None] * capacity
        self._tags: dict[str, str] = {}  # one string object per distinct value
        #: Each row's tag set as a code into ``tag_sets`` (0: no tags), so request-time tag filters are a
        #: lookup per distinct tag set and a numpy take per page, never a parse per song.
        self.tag_code = np.zeros(capacity, np.int32)
        self.tag_sets: list[frozenset[str]] = [frozenset()]
        self._tag_code: dict[str | None, int] = {None: 0}
        self._tag_masks: dict[tuple[frozenset[str], str], np.ndarray] = {}  # tag_mask's, most recent last
        self.feeds: dict[str, FeedOrder] = {name: FeedOrder() for name in feeds}
        #: Counts the removals (freed rows, which a later song may take) and feed replacements: rows read
        #: across an await (a personal page's read-ahead) hold only while this has not moved. Upserts
        #: leave it: a song keeps its row, and a new one takes a row only after a removal freed it.
        self.changes = 0

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
        self.eplays[target] = np.nan if batch.eplays is None else batch.eplays[src]
        self.prior_sd[target] = np.nan if batch.prior_sd is None else batch.prior_sd[src]
        self.ood[target] = False if batch.ood is None else batch.ood[src]
        self.likes[target] = batch.likes[src]
        self.created_ts[target] = batch.created_ts[src]
        self.duration_s[target] = batch.duration_s[src]
        self.untrained[target] = batch.untrained[src]
        for row, j in zip(target.tolist(), src.tolist(), strict=True):
            self.generator[row] = _code(batch.generators[j], self._generator_code, self.generator_names)
            self.model[row] = _code(batch.model_versions[j], self._model_code, self.model_names)
            tags = batch.raw_tags[j]
            self.raw_tags[row] = None if tags is None else self._tags.setdefault(tags, tags)
            self.tag_code[row] = self._tag_set(tags)
        self._drop_dead_tags()
        self._drop_dead_names()

    def remove(self, song_ids: Iterable[str]) -> int:
        """Drop these songs' rows (their feed entries are the feed orders' business); how many had one."""
        self.changes += 1
        dropped = 0
        for song_id in song_ids:
            row = self.row_of.pop(song_id, None)
            if row is None:
                continue
            self.ids[row] = None
            self.raw_tags[row] = None
            self.tag_code[row] = 0  # a free row holds no tag set: _drop_dead_tags keeps the sets rows hold
            self.model[row] = -1
            self.generator[row] = -1  # as for tags: _drop_dead_names keeps the names rows hold
            self._free.append(row)
            dropped += 1
        self._drop_dead_tags()
        self._drop_dead_names()
        return dropped

    def set_feed(self, feed: str, order: FeedOrder) -> None:
        """Replace a feed's order whole."""
        self.changes += 1
        self.feeds[feed] = order

    def shared_id(self, song_id: str) -> str:
        """The table's own string for this id when it has a row (a feed then holds no copy of it)."""
        row = self.row_of.get(song_id)
        return song_id if row is None else self.ids[row] or song_id

    def _tag_set(self, raw: str | None) -> int:
        """The code of a raw tags value (its parsed set appended to ``tag_sets`` when new)."""
        code = self._tag_code.get(raw)
        if code is None:
            code = self._tag_code[raw] = len(self.tag_sets)
            self.tag_sets.append(frozenset(parse_tags(raw)))
        return code

    def tag_mask(self, wanted: frozenset[str], mode: str) -> np.ndarray:
        """Which tag sets (by code) pass a tag filter (:func:`~ranker.serving.policy.tags_match`).

        Kept for the last :data:`_TAG_MASKS` filters: tag sets are appended, so a kept mask is extended
        by the sets added since, never recomputed (:meth:`_drop_dead_tags` renumbers the kept masks too)."""
        key = (wanted, mode)
        sets = self.tag_sets
        mask = self._tag_masks.pop(key, None)
        done = 0 if mask is None else len(mask)
        if done < len(sets):
            more = np.fromiter((tags_match(t, wanted, mode) for t in sets[done:]), np.bool_, len(sets) - done)
            mask = more if mask is None else np.concatenate([mask, more])
        assert mask is not None
        self._tag_masks[key] = mask
        if len(self._tag_masks) > _TAG_MASKS:
            del self._tag_masks[next(iter(self._tag_masks))]
        return mask

    def _drop_dead_tags(self) -> None:
        """Forget the tag sets no row holds once they outnumber the songs (with :data:`_TAG_SLACK` to spare).

        Without it, every distinct tags value ever seen would stay (free-form tags: one per song), and
        an uncached tag filter would decide each of them. Codes are renumbered in order, so a kept mask
        is the old one less the dropped codes. A drop is one numpy pass over the rows; the next one waits
        for :data:`_TAG_SLACK` new sets, or half the songs gone."""
        sets = self.tag_sets
        if len(sets) <= 2 * len(self.row_of) + _TAG_SLACK:
            return
        keep = _compact(self.tag_code[: self._end], len(sets), always=0)  # free rows hold 0: no tags
        self.tag_sets = [sets[c] for c in keep.tolist()]
        new = dict(zip(keep.tolist(), range(len(keep)), strict=True))
        self._tag_code = {raw: new[c] for raw, c in self._tag_code.items() if c in new}
        self._tags = {raw: value for raw, value in self._tags.items() if raw in self._tag_code}
        self._tag_masks = {key: mask[keep[: np.searchsorted(keep, len(mask))]] for key, mask in self._tag_masks.items()}

    def _drop_dead_names(self) -> None:
        """Forget the generator names and model versions no row holds, as :meth:`_drop_dead_tags` does tag sets.

        Both are free text from the events (a producer may name a build per song), so without it every name
        ever seen would stay until a restart. Rows keep their values: their codes are renumbered in order."""
        bound = 2 * len(self.row_of) + _NAME_SLACK
        if len(self.generator_names) > bound:
            keep = _compact(self.generator[: self._end], len(self.generator_names)).tolist()
            self.generator_names = [self.generator_names[c] for c in keep]
            self._generator_code = {name: code for code, name in enumerate(self.generator_names)}
        if len(self.model_names) > bound:
            keep = _compact(self.model[: self._end], len(self.model_names)).tolist()
            self.model_names = [self.model_names[c] for c in keep]
            self._model_code = {name: code for code, name in enumerate(self.model_names)}

    def generator_codes(self, names: Iterable[str]) -> list[int]:
        """The codes of those of ``names`` that some row holds, or held since the last drop (others have none)."""
        get = self._generator_code.get
        return [code for code in (get(name) for name in names) if code is not None]

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
            ("eplays", np.nan),
            ("prior_sd", np.nan),
            ("ood", False),
            ("likes", 0.0),
            ("created_ts", 0.0),
            ("duration_s", np.nan),
            ("generator", 0),
            ("tag_code", 0),
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
        return np.fromiter(map(self.row_of.get, song_ids, repeat(-1)), np.intp, len(song_ids))

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
            eplays=self.eplays[rows].astype(np.float64),
            prior_sd=self.prior_sd[rows],
            ood=self.ood[rows],
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
            self.eplays,
            self.prior_sd,
            self.ood,
            self.likes,
            self.created_ts,
            self.duration_s,
            self.generator,
            self.tag_code,
            self.key,
            self.model,
            self.untrained,
        )
        return int(sum(a.nbytes for a in arrays))


def _compact(column: np.ndarray, count: int, *, always: int | None = None) -> np.ndarray:
    """Renumber ``column`` (codes below ``count``; -1: a freed row, kept) in place to the codes it holds,
    in order; the old codes kept, ascending (``always`` among them). One numpy pass over the rows."""
    used = np.zeros(count + 1, np.bool_)  # one slot more: -1 indexes it, and renumbers to -1
    used[column] = True
    used[count] = False
    if always is not None:
        used[always] = True
    keep = np.flatnonzero(used)
    renumber = np.full(count + 1, -1, np.int32)
    renumber[keep] = np.arange(len(keep), dtype=np.int32)
    column[:] = renumber[column]
    return keep


def _code(name: str, codes: dict[str, int], names: list[str]) -> int:
    """``name``'s number in an interned column (a new name gets the next one)."""
    code = codes.get(name)
    if code is None:
        code = codes[name] = len(names)
        names.append(name)
    return code
