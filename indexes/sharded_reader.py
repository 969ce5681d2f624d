"""Similar-song search fanned out over several workers' index shards, each read by an
:class:`~indexes.index_reader.IndexReader`: shards join as their workers start, and leave when deleted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexes.reader_status import NotLoaded, ReaderStatus, frozen
from indexes.reader_threads import every
from indexes.vector_mean import mean_direction

if TYPE_CHECKING:
    from indexes.index_reader import IndexReader

log = logging.getLogger("indexes.index_reader")


class ShardedIndexReader:
    """Similar-song search over several workers' index shards: ask each, keep the k best.

    Each worker owns one index directory and Kafka gives every song to one worker, so a song
    lives in exactly one shard; its vector is looked up there and searched in all of them.

    With ``discover`` (the shard directories a glob finds now), shards that appear later (a
    worker scaled out) join at every refresh, without a restart. A new shard joins once its
    reader has loaded a store, so a worker that has not written yet never makes the reader
    (and /readyz) not ready. The reader list is replaced, never changed in place: a search
    running meanwhile finishes over the list it started with.

    A shard whose directory the glob no longer finds (deleted, so that its songs leave search)
    leaves at the next discovery: its reader is closed and no longer counts for readiness. Until
    then it adds nothing to a search (its own refresh drops its index once the store is gone). The
    last shard stays, not ready, as at a start with none.
    """

    def __init__(self, readers: Sequence[IndexReader], *, discover: Callable[[], Sequence[Path]] | None = None) -> None:
        if not readers:
            raise ValueError("a sharded reader needs at least one shard")
        self.readers = list(readers)
        self._direction: tuple[tuple[int, ...], np.ndarray | None] = ((), None)  # (the shards' generations, it)
        self._discover = discover
        self._joining = threading.Lock()  # one discovery at a time (the refresh thread and POST /v1/index/reload)
        self._every_s: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def discover(self) -> list[Path]:
        """Open readers for shard directories that appeared since, close those of shards deleted since;
        the directories that joined."""
        if self._discover is None:
            return []
        from indexes.index_reader import IndexReader  # not at the top: that module re-exports this one

        with self._joining:
            known = {r.directory for r in self.readers}
            first = self.readers[0]
            found = list(self._discover())
            added: list[IndexReader] = []
            for directory in found:
                if directory in known:
                    continue
                reader = IndexReader(directory, first.factory, expected_size=first.expected_size, nprobe=first.nprobe)
                if reader.load().ready:
                    added.append(reader)
                else:  # no store there yet: looked for again at the next refresh
                    reader.close()
            kept = [r for r in self.readers if r.directory in found]
            gone = [r for r in self.readers if r.directory not in found]
            if not kept and not added:
                kept, gone = gone[:1], gone[1:]
            if added or gone:
                self.readers = [*kept, *added]
            if added:
                log.info("index reader: %d new shards joined: %s", len(added), [str(r.directory) for r in added])
                if self._every_s is not None:
                    for r in added:
                        r.start(self._every_s)
            for r in gone:  # a search still on the old list finds it closed, and skips it
                r.close()
                log.warning("index reader: shard %s is gone; its songs left similar-song search", r.directory)
            return [r.directory for r in added]

    def load(self) -> ReaderStatus:
        for r in self.readers:
            r.load()
        self.discover()
        return self.status()

    def refresh(self) -> int:
        self.discover()
        return sum(r.refresh() for r in self.readers)

    def start(self, every_s: float) -> None:
        """Each shard refreshes on its own thread; with ``discover``, one more looks for new shards."""
        if self._every_s is not None:
            return
        self._every_s = every_s
        for r in self.readers:
            r.start(every_s)
        if self._discover is None:
            return

        self._thread = every(every_s, self._stop, self.discover, "index-shards")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._joining:
            for r in self.readers:
                r.close()

    def status(self) -> ReaderStatus:
        parts = [r.status() for r in self.readers]
        reasons = [f"{r.directory}: {p.reason}" for r, p in zip(self.readers, parts, strict=True) if p.reason]
        return ReaderStatus(
            ready=all(p.ready for p in parts),
            vectors=sum(p.vectors for p in parts),
            watermark=min(p.watermark for p in parts),
            source=",".join(sorted({p.source for p in parts})),
            reason="; ".join(reasons) or None,
        )

    @property
    def ready(self) -> bool:
        return self.status().ready

    def vectors(self, song_ids: Sequence[str], keys: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        key_of = dict(zip(song_ids, keys, strict=True)) if keys is not None else {}
        for r in self.readers:
            todo = [s for s in song_ids if s not in out]
            out.update(r.vectors(todo, [key_of[s] for s in todo] if keys is not None else None))
        return {s: out[s] for s in song_ids if s in out}

    def mean_direction(self) -> np.ndarray | None:
        """:meth:`IndexReader.mean_direction` over every shard's vectors (recomputed when a shard's sum moved)."""
        generation = tuple(r.sum_generation for r in self.readers)
        cached, direction = self._direction
        if cached != generation:
            direction = frozen(mean_direction([r.vector_sum() for r in self.readers]))
            self._direction = (generation, direction)
        return direction

    def vector_matrix(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`IndexReader.vector_matrix` over the shards (a song lives in one; the first found wins)."""
        asked = np.asarray(keys, dtype=np.int64)
        found = np.zeros(len(asked), np.bool_)
        matrix = np.zeros((len(asked), 0), np.float32)
        for r in self.readers:
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            got, rows = r.vector_matrix(asked[todo])
            if not got.any():
                continue
            if matrix.shape[1] != rows.shape[1]:
                if matrix.shape[1]:  # shards of another dimension: keep the first one's
                    continue
                matrix = np.zeros((len(asked), rows.shape[1]), np.float32)
            matrix[todo[got]] = rows[got]
            found[todo[got]] = True
        return found, matrix

    def similar(self, song_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest songs over every shard; a shard holding no index (deleted, or not loaded)
        adds nothing, and :class:`NotLoaded` is raised only when no shard holds one."""
        readers = self.readers  # one list throughout: a discovery replaces it
        vector, loaded = None, False
        for r in readers:
            try:
                vector = r.vector_of(song_id)
            except NotLoaded:
                continue
            loaded = True
            if vector is not None:
                break
        if not loaded:
            raise NotLoaded("no index shard is loaded")
        if vector is None:
            raise KeyError(song_id)
        best: dict[str, float] = {}  # a song found in several shards (re-ingested elsewhere) counts once
        for reader in readers:
            try:
                hits = reader.search(vector, k + 1)
            except NotLoaded:
                continue
            for hit, sim in hits:
                if hit != song_id and (hit not in best or sim > best[hit]):
                    best[hit] = sim
        return sorted(best.items(), key=lambda h: -h[1])[:k]
