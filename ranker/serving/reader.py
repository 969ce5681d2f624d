"""The API's read path: feed pages, reranking of candidates, one song's record.

Pages and reranks are served from the process's song table (:mod:`ranker.serving.table`,
kept current by :mod:`ranker.serving.table_sync`), with no store round trip. A page walks
the feed's order after its cursor (request filters, :mod:`ranker.serving.filters`, masked
in the same scan), then is assembled over the window's columns (:mod:`ranker.serving.assembly`).
The cursor is keyset based (:mod:`ranker.serving.cursor`). One song's record
(``/v1/songs/{id}``) is read from the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter

from indexes.base import AsyncScoreReads
from indexes.listeners import AsyncListenerReads, Listener, ListenerStateUnavailable, NullAsyncListenerReads, Taste
from ranker.serving.assembly import assemble, explore_layout, next_cursor, page_items
from ranker.serving.columns import (
    RankResponse,
)
from ranker.serving.cursor import Cursor, _after
from ranker.serving.filters import NO_FILTERS, RequestFilters
from ranker.serving.page_cache import PageCache, _Window, window_key
from ranker.serving.personal import BlockVectors, Personal, block_gram, personal, reorder_block, user_tag
from ranker.serving.policy import (
    Policy,
    calibration_scale,
    compile_policies,
    explore_slots,
    refresh,
)
from ranker.serving.rerank import rerank
from ranker.serving.song_detail import song_detail
from ranker.serving.table import FeedRange, SongTable
from ranker.serving.table_sync import TableSync
from ranker.settings import FeedPolicy, Settings

_MAX_FETCHES = 4
log = logging.getLogger(__name__)

#: ``listener_state`` of a personal answer served without the listener's state.
UNAVAILABLE = "unavailable"
LISTENER_UNAVAILABLE = Counter(
    "apexrank_api_listener_unavailable_total",
    "Personal pages and reranks served as the cold-start answer: the listener state was unreachable",
)


class UnknownFeedError(KeyError):
    """No feed of that name is configured."""


class TableNotReady(RuntimeError):
    """The song table is still loading (the API answers 503 and /readyz is false)."""


# -- reads --------------------------------------------------------------------------------------
class VectorSource(Protocol):
    def vectors(self, song_ids: Sequence[str], keys: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The songs' vectors, in their order (absent ones left out); ``keys``: their faiss ids."""

    def vector_matrix(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of these faiss ids as one matrix in their order, and which were found."""

    def mean_direction(self) -> np.ndarray | None:
        """The catalog's mean vector, unit length (None before any vector)."""


@dataclass
class FeedPage:
    """A page, and what its served record needs: per item the propensity of its exploration slot
    (1.0 for an exploit item), and the pool the explored songs were drawn from (feed order)."""

    feed: str
    items: list[dict[str, Any]]
    next_cursor: str | None
    propensity: list[float] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    #: A personal page served as the cold-start page: the listener's state could not be read.
    listener_unavailable: bool = False


class FeedReader:
    """The API's read path: feed pages, reranking of candidates, a song's record."""

    def __init__(
        self,
        settings: Settings,
        reads: AsyncScoreReads,
        vectors: VectorSource | None = None,
        *,
        listeners: AsyncListenerReads | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is the wall clock scores are computed at; ``monotonic`` times the caches;
        ``listeners``: taste and heard sets for personal pages (none: every user is new)."""
        self.settings = settings
        self.reads = reads
        self.vectors = vectors
        self.listeners = listeners or NullAsyncListenerReads()
        #: Each generator's calibration factor, shared by every policy of this reader, refreshed with the scale.
        self.factors: dict[str, float] = {}
        self.policies = compile_policies(settings.feed.feeds, settings.feed.like_rate, self.factors)
        self._clock = clock
        self._monotonic = monotonic
        self._scale = 1.0
        self._scale_at = -math.inf
        self.page_cache = PageCache(settings.api.page_cache_ttl_s, settings.api.page_cache_max_bytes, monotonic)
        #: The song table pages and reranks are served from: loaded and followed by ``sync``
        #: (``sync.start()`` in a running event loop, or ``await sync.load()``).
        self.sync = TableSync(reads, list(self.policies), poll_s=settings.api.table_poll_s)

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
        policy = Policy(name, merged, self.settings.feed.like_rate, self.factors)
        if not math.isfinite(policy.decay):
            raise ValueError(f"half_life_hours: {merged.half_life_hours!r} is too short to decay by")
        return policy

    async def scale(self) -> float:
        """The calibration scale, cached for ``api.calibration_ttl_s``.

        Once read, a failed refresh keeps the last value (and tries again after the TTL): with
        the song table in memory, pages and reranks go on through a store outage.
        """
        now = self._monotonic()
        if now - self._scale_at >= self.settings.api.calibration_ttl_s:
            try:
                totals = await self.reads.calibration_totals()
                if self.settings.feed.like_rate.generator_calibration:
                    refresh(self.factors, await self.reads.generator_calibration())
            except Exception as exc:
                if math.isinf(self._scale_at):
                    raise  # never read: nothing to serve with
                log.warning("calibration totals unreadable (%s: %s); keeping the last scale", type(exc).__name__, exc)
                self._scale_at = now
                return self._scale
            self._scale = calibration_scale(*totals, self.settings.feed.like_rate)
            self._scale_at = now
        return self._scale

    # -- pages ---------------------------------------------------------------------------------
    @property
    def table(self) -> SongTable:
        """The song table this process serves from; :class:`TableNotReady` while it loads."""
        table = self.sync.table
        if table is None:
            raise TableNotReady("the song table is loading")
        return table

    async def page(
        self,
        feed: str,
        limit: int,
        cursor: str | None = None,
        *,
        rng: np.random.Generator | None = None,
        filters: RequestFilters = NO_FILTERS,
        user: str | None = None,
    ) -> FeedPage:
        """A page of ``feed`` from the song table: no store round trip (but the calibration's, once per TTL).

        ``filters`` narrow the feed (exploration draws from the songs they pass too); the cursor
        must come from a page with the same filters (:class:`~ranker.serving.cursor.CursorFiltersError`).
        ``user``: a personal page (one round trip for the listener's state; docs/ranking.md, "Personal
        feeds"): the cursor must be theirs or of no user; a new listener gets the cold-start page.
        """
        policy = self.policy(feed)
        cur = Cursor.decode(cursor, feed, filters.tag, user_tag(user)) if cursor else None
        n_explore = explore_slots(limit, policy.config.explore_share)
        want = limit + (policy.config.explore_pool if n_explore else 0)
        first: FeedRange | None = None
        if user:  # the listener's state is read while the first range of their scan is
            reading = asyncio.ensure_future(self.person(user))
            try:
                await asyncio.sleep(0)  # one turn of the loop: the read goes out now, not at the await below
                scale = await self.scale()
                table = self.table
                now = self._clock()
                first = self._read_ahead(table, policy, want, cur, now, filters)
                person: Personal | None = await reading
            finally:
                reading.cancel()  # a no-op once it is done; on an error here, nothing is left running
        else:
            person = None
            scale = await self.scale()
            table = self.table  # after the await: what is served comes from one table
            now = self._clock()
        if person is None or person.new:
            window = self._window(table, policy, want, cur, cursor, now, filters)
        else:
            window = self._personal_window(table, policy, want, cur, now, filters, person, first)
        chosen, explored, pool = assemble(policy, window, limit - n_explore, n_explore, scale, now, rng)
        page_len = len(chosen) + len(explored)
        positions, chances = explore_layout(policy, page_len, explored, pool, rng)
        items = page_items(policy, window, chosen, explored, scale, now, person, positions)
        propensity = [1.0] * page_len
        for pos, chance in zip(positions, chances, strict=True):
            propensity[pos] = chance
        assert window.batch is not None
        ids = window.batch.song_ids
        pool_ids = [ids[j] for j in pool.rows.tolist()] if explored and pool is not None else []
        skip = set(cur.skip) if cur else set()
        b_score, b_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        bound = user_tag(user) if (person is not None and not person.new) or (cur and cur.user) else 0
        following = next_cursor(feed, window, items, skip, b_score, b_id, filters.tag, bound)
        unavailable = person is not None and person.unavailable
        return FeedPage(feed, items, following, propensity, pool_ids, listener_unavailable=unavailable)

    async def person(self, user: str) -> Personal:
        """The listener's taste and heard set (one round trip), as a page or a rerank blends them.

        When the listener state cannot be read (Redis down), the listener is served as a new one, the
        cold-start answer, marked ``unavailable``: the song table carries pages through a store outage,
        and a signed-in listener's page should not be the one that fails."""
        centre = self.vectors.mean_direction() if self.vectors is not None else None
        try:
            listener = await self.listeners.listener(user, self._clock())
        except ListenerStateUnavailable as exc:
            LISTENER_UNAVAILABLE.inc()
            log.warning("listener state unreadable (%s); serving the cold-start answer", exc)
            return personal(user, Listener(Taste(None, 0.0)), self.settings.feed, centre, unavailable=True)
        return personal(user, listener, self.settings.feed, centre)

    def _scan_size(self, want: int, cur: Cursor | None, blends: bool) -> int:
        """The eligible rows a personal window scans for: the taste block's (left) and a page, or a page."""
        end = cur.block if cur is not None else None
        passed = end is not None and cur is not None and _after(cur.score, cur.song_id, end[0], end[1])
        size = self.settings.api.personal_window
        return (size if end is None else end[2]) + want if blends and not passed else want

    def _read_ahead(
        self, table: SongTable, policy: Policy, want: int, cur: Cursor | None, now: float, filters: RequestFilters
    ) -> FeedRange:
        """The first range a blending listener's window reads, masked by all but their heard songs (which
        are still on their way): :meth:`_window` uses it when its first range is this one."""
        requested = filters.requested
        excluded = requested.excluded(table) if not requested.empty else None
        start = (cur.score, cur.song_id) if cur else (math.inf, "")
        count = self._scan_size(want, cur, True) + 8 + _skipped(cur)
        return FeedRange.read(table, policy, cur, start, count, now, requested, excluded)

    def _personal_window(
        self,
        table: SongTable,
        policy: Policy,
        want: int,
        cur: Cursor | None,
        now: float,
        filters: RequestFilters,
        person: Personal,
        first: FeedRange | None = None,
    ) -> _Window:
        """The feed after the cursor without the heard songs, its taste block re-ordered by the blend.

        The block is the first ``api.personal_window`` eligible rows of the walk (from where a walk
        first turns personal), its end carried by the cursors: every later page re-orders what is left
        of it with the taste as it is then, and the block's songs served ride in the skip set until the
        boundary passes them, so none is served twice. Below the block, the feed's own order. Never
        cached (the window is one listener's)."""
        size = self.settings.api.personal_window
        end = cur.block if cur is not None else None
        passed = end is not None and cur is not None and _after(cur.score, cur.song_id, end[0], end[1])
        scan = self._scan_size(want, cur, person.blends)
        read = self.vectors.vector_matrix if self.vectors else None
        blocks: list[BlockVectors] = []

        def arrange(window: _Window) -> np.ndarray | None:
            window.block = end
            done = reorder_block(window, person, size, read)
            if done is None:
                return None
            blocks.append(done[1])
            return done[0]

        found = self._window(
            table,
            policy,
            scan,
            cur,
            None,
            now,
            filters.excluding(person.heard),
            cache=False,
            gram=False,
            first=first,
            arrange=arrange if person.blends and not passed else None,
            skipped=_skipped(cur),
        )
        found.block = end if not blocks else found.block
        self._near_duplicates(found, table, policy, want, blocks[0] if blocks else None)
        return found

    def _window(
        self,
        table: SongTable,
        policy: Policy,
        want: int,
        cur: Cursor | None,
        token: str | None,
        now: float,
        filters: RequestFilters = NO_FILTERS,
        *,
        cache: bool = True,
        gram: bool = True,
        first: FeedRange | None = None,
        arrange: Callable[[_Window], np.ndarray | None] | None = None,
        skipped: int = 0,
    ) -> _Window:
        """The rows after the cursor until ``want`` are eligible, read as the store's range reads would.

        The same reads the store path made (ranges of ``want - eligible + 8`` rows from the last
        row seen, at most :data:`_MAX_FETCHES`), from the table's copy of the feed: a page is the
        one the store gave, except where the store path stalled on ties (see below). Reused for
        ``api.page_cache_ttl_s`` by requests for the same page and filters when the page cache is
        on (:class:`PageCache`).

        Under request filters the scan reads on in doubling ranges until ``want`` rows pass or
        ``api.filter_scan_rows`` rows are passed: each range is masked at once (numpy over the
        table's columns), so a filtered page is still one walk of the feed. A scan stopped by that
        bound serves a short page whose cursor resumes after the last row it read. A listener's heard
        songs alone (a bounded set, most rows pass) read as the unfiltered walk does, what is still
        wanted plus 8 a range, within the same bound: doubling would read hundreds of rows no page uses.
        ``first``: the scan's first range, read ahead (:meth:`~ranker.serving.table.FeedRange.read`);
        used only if it is the range this scan reads and the table was not written since (a takedown or
        the change log may have freed its rows, or given them to other songs, while the listener's state
        was read).
        ``arrange``: re-orders the eligible rows before their columns are taken (a personal page's block),
        giving the permutation (None: as they are), so the columns are copied once, in page order.
        ``skipped``: rows the first range reads beyond that (a personal page: its cursor's skip set, the
        block's songs served on earlier pages, which lie ahead of the boundary), so that the scan is
        mostly one range; a feed page reads as the store path did.
        """
        pages = self.page_cache
        key = window_key(policy.name, token, want, filters.tag)
        if cache and pages.enabled:
            hit = pages.get(key)
            if hit is not None:
                return hit
        start_score, start_id = (cur.score, cur.song_id) if cur else (math.inf, "")
        filtered = not filters.empty
        requested = filters.requested
        excluded = requested.excluded(table) if not requested.empty else None
        heard = filters.heard_flags(table)
        budget = self.settings.api.filter_scan_rows
        found = _Window(self._monotonic())
        rows: list[int] = []  # the eligible rows' places in the table
        fetches = 0
        while True:
            count = want - len(found.eligible) + 8 + (skipped if not fetches else 0)
            if not requested.empty:  # request filters may pass few rows: doubling ranges, within the budget
                count = max(count, min(want << fetches, budget - len(found.ids)))
            if (
                fetches == 0
                and first is not None
                and (first.start, first.count, first.changes) == ((start_score, start_id), count, table.changes)
            ):
                got = first  # read while the listener's state was on its way (the table unwritten since)
            else:
                got = FeedRange.read(table, policy, cur, (start_score, start_id), count, now, requested, excluded)
            fetches += 1
            found.exhausted = len(got.got) < count
            ok = got.ok
            if heard is not None:  # the listener's heard songs, the one mask that waits for their state
                ok &= ~heard[np.where(ok, got.at, 0)]
            base = len(found.ids)
            found.ids.extend(got.ids)
            found.stored.extend(got.scores)
            found.keys.extend(got.keys.tolist())
            found.eligible.extend((np.flatnonzero(ok) + base).tolist())
            rows.extend(got.at[ok].tolist())
            if found.exhausted or len(found.eligible) >= want or not got.got:
                break
            if (len(found.ids) >= budget) if filtered else (fetches >= _MAX_FETCHES):
                break
            start_score, start_id = got.got[-1]
        at = np.asarray(rows, np.intp)
        perm = arrange(found) if arrange is not None else None
        found.batch = table.batch(at if perm is None else at[perm], now)
        if gram:
            self._near_duplicates(found, table, policy, len(rows))
        if cache:
            pages.put(key, found)
        return found

    def _near_duplicates(
        self, found: _Window, table: SongTable, policy: Policy, count: int, block: BlockVectors | None = None
    ) -> None:
        """The cosines between every pair of the window's first ``count`` rows (the near-duplicate check's);
        ``block``: a personal page's block vectors, already read (its rows lead the window)."""
        batch = found.batch
        if policy.config.dedup_threshold is None or self.vectors is None or batch is None or not len(batch):
            return
        ids = batch.song_ids[:count]
        if block is not None and block.matrix.shape[1]:
            found.slot, found.gram = block_gram(table, ids, block, self.vectors.vector_matrix)
            return
        keys = table.key[np.fromiter(map(table.row_of.__getitem__, ids), np.intp, len(ids))]
        got, matrix = self.vectors.vector_matrix(keys)
        if got.any():
            rows = np.flatnonzero(got)
            found.slot = {ids[j]: n for n, j in enumerate(rows.tolist())}
            matrix = matrix if len(rows) == len(ids) else matrix[rows]
            found.gram = matrix @ matrix.T  # cosines between every pair of candidates, once

    # -- rerank --------------------------------------------------------------------------------
    async def rank(
        self,
        candidates: Sequence[str],
        policy: Policy,
        *,
        apply_filters: bool = False,
        explain: bool = True,
        filters: RequestFilters = NO_FILTERS,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Order known candidates by the policy's score; unknown (unscored) and filtered ids listed apart."""
        ranked = await self.rank_response(
            candidates, policy, apply_filters=apply_filters, explain=explain, filters=filters, user=user
        )
        return ranked.body

    async def rank_response(
        self,
        candidates: Sequence[str],
        policy: Policy,
        *,
        apply_filters: bool = False,
        explain: bool = True,
        filters: RequestFilters = NO_FILTERS,
        user: str | None = None,
    ) -> RankResponse:
        """:meth:`rank`'s body, and where its first non-finite number is (:func:`~ranker.serving.rerank.rerank`),
        after the listener's state and the calibration scale are read. A new listener's answer is the
        one without ``user``."""
        person = await self.person(user) if user else None
        scale = await self.scale()
        ranked = rerank(
            self.table,
            policy,
            candidates,
            scale=scale,
            now=self._clock(),
            person=person,
            vectors=self.vectors,
            apply_filters=apply_filters,
            explain=explain,
            filters=filters,
        )
        if person is not None and person.unavailable:
            ranked.body["listener_state"] = UNAVAILABLE
        return ranked

    def forget(self, song_ids: Sequence[str]) -> int:
        """Drop taken-down songs from the song table and its feeds now (the change log would, a moment
        later); how many had a row."""
        table = self.sync.table
        if table is None:
            return 0
        for order in table.feeds.values():
            for song_id in song_ids:
                order.set(song_id, None)
        return table.remove(song_ids)

    # -- one song ------------------------------------------------------------------------------
    async def song(self, song_id: str) -> dict[str, Any] | None:
        """A song's scores, engagement, prior and posterior per feed; None if it is not scored."""
        raw = await self.reads.get_song(song_id)
        if not raw:
            return None
        return song_detail(song_id, raw, self.policies, self.settings.feed.name, await self.scale(), self._clock())


def _skipped(cur: Cursor | None) -> int:
    """Rows a personal scan's first range reads past its target: the songs its cursor skips."""
    return len(cur.skip) if cur is not None else 0
