"""Retention: the worker's sweep of its own shard, so memory and disk stay flat as songs keep coming.

A song whose embedding was written more than ``retention.window_days`` ago (it was scored
then) leaves the hot path, in three steps per batch, each safe to repeat:

1. its embedding (vector and pooled layers), with its generator, creation time and model from
   the score store, goes to the archive (:mod:`indexes.archive`, Parquet outside the store),
   durably: nothing is lost if a later step fails;
2. the score store takes it out of every feed and shrinks its hash to what the engagement
   history needs (:meth:`indexes.ScoreStore.expire_songs`), which itself goes
   ``retention.history_days`` later if set; the API's tables drop it;
3. the embedding store deletes it (:meth:`indexes.embedding_index.EmbeddingIndex.delete`):
   the shard's FAISS index removes the vector at once, every API reader as it catches up.

A crash between steps leaves the song in the store, so the next sweep does it again: the
archive file is rewritten under the same name, the expiry changes nothing twice.

Then the store forgets deletion records older than ``retention.deletions_keep_s`` that the
index's snapshot on disk covers, so the store stays flat too (a reader that far behind reloads).

The worker sweeps (it is its shard's single writer), between batches, at most every
``retention.sweep_every_s`` and at most :data:`MAX_BATCHES_PER_CALL` batches at a time, so a
backlog (retention switched on over a full store) never stalls consumption for long: the
next call goes on at once. The clock is injectable (the soak benchmark simulates days).

A feedback write racing the expiry (engagement read the song's scores just before, and
writes its feed entries just after) could put it back into a feed: each sweep therefore
expires the previous sweep's songs once more (idempotent; it only removes them again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consumers import metrics
from indexes import EmbeddingArchive, ScoreStore
from indexes.archive import SongMeta
from indexes.redis_schema import CREATED_AT, GENERATOR, MODEL_VERSION
from ranker.settings import Settings

if TYPE_CHECKING:
    from indexes.embedding_index import EmbeddingIndex

log = logging.getLogger(__name__)

#: Batches one :meth:`RetentionSweeper.maybe_sweep` call handles before it lets the worker consume again.
MAX_BATCHES_PER_CALL = 20
DAY_S = 86400.0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    expired: int  # embeddings archived and deleted from the store (and so from the index)
    shrunk: int  # song hashes shrunk in the score store
    archive_bytes: int
    deletions_pruned: int
    seconds: float
    done: bool  # False: MAX_BATCHES_PER_CALL reached with more to do


class RetentionSweeper:
    """Expires this shard's songs older than the window (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        index: EmbeddingIndex,
        store: ScoreStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cfg = settings.retention
        self.window_s = None if cfg.window_days is None else cfg.window_days * DAY_S
        self.every_s = cfg.sweep_every_s
        self.batch = cfg.batch
        self.deletions_keep_s = cfg.deletions_keep_s
        self.history_s = None if cfg.history_days is None else cfg.history_days * DAY_S
        self.feeds = list(settings.feed.feeds)
        self.index = index
        self.store = store
        self.archive = EmbeddingArchive(settings.archive_dir, index.store.store_uid())
        self.clock = clock
        self._next_at = -float("inf")
        self._recent: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.window_s is not None

    def maybe_sweep(self) -> SweepReport | None:
        """Sweep if retention is on and the last finished sweep is ``sweep_every_s`` old; its report."""
        if self.window_s is None:
            return None
        now = self.clock()
        if now < self._next_at:
            return None
        report = self.sweep(now, MAX_BATCHES_PER_CALL)
        if report.done:
            self._next_at = now + self.every_s
        return report

    def sweep(self, now: float, max_batches: int | None = None) -> SweepReport:
        """Expire every song of this shard written before ``now - window`` (up to ``max_batches`` batches)."""
        if self.window_s is None:
            raise ValueError("retention.window_days is not set: nothing expires")
        started = time.perf_counter()
        cutoff = now - self.window_s
        if self._recent:  # see the module docstring: a feedback write may have raced the last sweep
            self.store.expire_songs(self._recent, self.feeds, now, self.history_s)
        recent: list[str] = []
        expired = shrunk = nbytes = batches = 0
        done = False
        while max_batches is None or batches < max_batches:
            rows = self.index.store.older_than(cutoff, self.batch)
            if not rows:
                done = True
                break
            ids = [stored.record.song_id for stored, _ in rows]
            path = self.archive.write(rows, now, self._meta(ids))
            size = path.stat().st_size if path is not None else 0
            shrunk += self.store.expire_songs(ids, self.feeds, now, self.history_s)
            self.index.delete(ids)
            expired += len(ids)
            nbytes += size
            batches += 1
            recent += ids
            metrics.SONGS_EXPIRED.inc(len(ids))
            metrics.ARCHIVE_BYTES.inc(size)
            if len(rows) < self.batch:
                done = True
                break
        self._recent = recent
        pruned = self.index.prune_deletions(now - self.deletions_keep_s)
        seconds = time.perf_counter() - started
        metrics.SWEEP_SECONDS.observe(seconds)
        if expired or pruned:
            log.info(
                "retention: %d songs expired (%d hashes shrunk, %d archive bytes), %d deletion records pruned, %.2fs",
                expired,
                shrunk,
                nbytes,
                pruned,
                seconds,
            )
        return SweepReport(expired, shrunk, nbytes, pruned, seconds, done)

    def _meta(self, song_ids: list[str]) -> dict[str, SongMeta]:
        """What the archive keeps of each song's score-store record (one round trip)."""
        songs = self.store.read_songs(song_ids, fields=[GENERATOR, CREATED_AT, MODEL_VERSION])
        return {s.song_id: SongMeta(s.generator, s.created_at, s.model_version) for s in songs if s is not None}
