"""Keeping an API process's song table as the score store has it: a full read, then the change log.

Every write to the score store (the worker's scored songs, the feedback consumer's feed
updates after engagement, a promotion's rescoring, a feed rebuild or trim, a deletion)
appends the song ids it touched to the store's change log after the write. A process
reads the log's position, then every song and every feed, then follows the log from that
position: for each batch of changes it reads those songs' fields and feed scores again and
writes what it finds (a song without scores any more loses its row). A change that lands
during the full read is applied twice, which is harmless: the table holds what the store
holds, never a sum of deltas, so the order in which changes arrive does not matter.

Staleness, the time from an entry's append to its application here, is exported as
``apexrank_table_staleness_seconds``. A process that falls further behind than the log keeps
(``changes_retention_s``, 10 minutes), or that finds the log reset, reads
everything again and swaps the new table in when it is complete; requests meanwhile use the
old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from indexes.base import AsyncScoreReads, Change
from ranker.serving.batch import SongBatch
from ranker.serving.state import TABLE_FIELDS
from ranker.serving.table import FeedOrder, SongTable

log = logging.getLogger(__name__)

TABLE_SONGS = Gauge("apexrank_table_songs", "Scored songs in this API process's song table")
TABLE_READY = Gauge("apexrank_table_ready", "1 once the song table is loaded")
TABLE_STALENESS = Histogram(
    "apexrank_table_staleness_seconds",
    "Time from a change's append to the store's change log to its application to the song table",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TABLE_LOADS = Counter("apexrank_table_loads_total", "Full reads of the score store into the song table")
TABLE_CHANGES = Counter("apexrank_table_changes_total", "Change log entries applied to the song table")
TABLE_BEHIND = Gauge(
    "apexrank_table_behind_seconds",
    "Seconds since the song table last held every change the log had (under table_poll_s while it keeps up; "
    "it grows while the store cannot be read or changes cannot be applied)",
)
TABLE_ERRORS = Counter("apexrank_table_errors_total", "Store errors met loading or following the change log")

#: Songs per read of the full load and of a change batch; feed members per scan call; change log
#: entries per read (up to 1,000 song ids each: a follower that is behind catches up in steps).
LOAD_BATCH = 1000
FEED_BATCH = 20_000
CHANGES_PER_READ = 100


class TableSync:
    """Loads a :class:`SongTable` from the score store and follows the store's change log."""

    def __init__(
        self,
        reads: AsyncScoreReads,
        feeds: Sequence[str],
        *,
        poll_s: float = 0.5,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reads = reads
        self.feeds = list(feeds)
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._clock = clock
        self.table: SongTable | None = None
        self.position = "0-0"
        self.applied = 0  # change log entries applied since start
        self.failures = 0  # store errors met (loading or following), each retried
        self.fresh_at: float | None = None  # when the table last held every change the log had
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._changed = asyncio.Event()

    # -- the full read -------------------------------------------------------------------------------
    async def load(self) -> SongTable:
        """Read every song and feed into a new table and swap it in; changes are followed from before the read."""
        position = await self.reads.change_position()
        started = self._clock()
        table = SongTable(self.feeds)
        async for ids in self.reads.scan_song_ids(LOAD_BATCH):
            await self._read_songs(table, ids)
        for feed in self.feeds:
            table.set_feed(feed, await self._read_feed(table, feed))
        self.table, self.position = table, position
        self.fresh_at = started  # what changed since is in the log, applied next
        TABLE_LOADS.inc()
        TABLE_READY.set(1)
        TABLE_SONGS.set(len(table))
        self._changed.set()
        log.info("song table loaded: %d songs, %s", len(table), {f: len(o) for f, o in table.feeds.items()})
        return table

    async def _read_feed(self, table: SongTable, feed: str) -> FeedOrder:
        """A feed's order, read whole with a scan (a member that moves meanwhile is in the log too).

        Sorting a million members holds the GIL for about a second whatever thread does it: a
        reload of a large feed (a rebuild, or a follower that fell behind the log) pauses the
        event loop that long; the first load happens before the process is ready.
        """
        scores: dict[str, float] = {}
        shared = table.shared_id
        async for chunk in self.reads.scan_feed(feed, FEED_BATCH):
            for song_id, score in chunk:
                scores[shared(song_id)] = score  # a member seen twice: the later read is the newer
        return FeedOrder(scores.items())

    async def _read_songs(self, table: SongTable, song_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(song_ids))
        if not ids:
            return
        values = await self.reads.read_fields(ids, TABLE_FIELDS)
        table.upsert(SongBatch.from_fields(ids, values))

    # -- following the change log -------------------------------------------------------------------
    async def apply(self, changes: Sequence[Change]) -> None:
        """Read again what these changes touched and write it into the table."""
        table = self.table
        if table is None or not changes:
            return
        ids = list(dict.fromkeys(song_id for change in changes for song_id in change.song_ids))
        whole = [feed for feed in dict.fromkeys(f for change in changes for f in change.feeds) if feed in table.feeds]
        for i in range(0, len(ids), LOAD_BATCH):
            chunk = ids[i : i + LOAD_BATCH]
            values = await self.reads.read_fields(chunk, TABLE_FIELDS)
            scores = await self.reads.feed_scores(self.feeds, chunk)
            table.upsert(SongBatch.from_fields(chunk, values))
            for feed, values_in_feed in scores.items():
                order = table.feeds[feed]
                for song_id, score in zip(chunk, values_in_feed, strict=True):
                    order.set(table.shared_id(song_id), score)
        for feed in whole:
            table.set_feed(feed, await self._read_feed(table, feed))
        self.position = changes[-1].position
        now = self._clock()
        for change in changes:
            TABLE_STALENESS.observe(max(0.0, now - change.at))
        self.applied += len(changes)
        TABLE_CHANGES.inc(len(changes))
        TABLE_SONGS.set(len(table))
        self._changed.set()

    async def step(self) -> int:
        """One read of the change log (waiting up to ``poll_s``) and its application; how many entries."""
        changes = await self.reads.read_changes(self.position, CHANGES_PER_READ, self.poll_s)
        read_at = self._clock()
        if changes:
            await self.apply(changes)
        if len(changes) < CHANGES_PER_READ:  # the read reached the log's end: the table held it all then
            self.fresh_at = read_at
        return len(changes)

    def _report_behind(self) -> None:
        TABLE_BEHIND.set(0.0 if self.fresh_at is None else max(0.0, self._clock() - self.fresh_at))

    async def run(self) -> None:
        """Load, then follow the change log until closed; store errors are retried, never fatal.

        Before each read of the log it checks that the log still holds its position: a process
        that fell further behind than the log keeps (or found it reset) reads the store whole.
        """
        delay = self.retry_s
        while not self._stopping:
            try:
                if self.table is None:
                    await self.load()
                elif await self.reads.changes_lost(self.position):
                    log.warning("the change log moved past this table (%s): reading it whole", self.position)
                    await self.load()
                else:
                    await self.step()
                delay = self.retry_s
                self._report_behind()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store down or a bad answer: keep serving what is loaded, retry
                self.failures += 1
                TABLE_ERRORS.inc()
                self._report_behind()
                self._changed.set()
                log.warning("song table: %s: %s; retrying in %.1f s", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self.run(), name="apexrank-table-sync")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop following. The loop also stops at its next pass: on Python 3.11 a cancellation can
        be lost inside redis-py's socket write (``asyncio.wait_for``), so it is repeated until the
        task ends, for ``timeout_s`` at most."""
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            deadline = time.monotonic() + timeout_s
            while not task.done() and time.monotonic() < deadline:
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if not task.done():
                log.warning("the song table's follower did not stop within %.0f s", timeout_s)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("the song table's follower ended with %r", task.exception())
        TABLE_READY.set(0)

    async def wait_loaded(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the first load; whether the table is loaded.

        Gives up at once when a load fails (the store unreachable): the caller serves 503s
        and /readyz says why while the load is retried in the background.
        """
        deadline = time.monotonic() + timeout_s
        failures = self.failures
        while self.table is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.failures > failures or (self._task is not None and self._task.done()):
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
        return True

    async def caught_up(self, timeout_s: float = 10.0) -> bool:
        """Wait until the table is loaded and has applied every change the log holds now (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.table is not None and not await self.reads.read_changes(self.position, 1, 0.0):
                return True
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)
        return False
