"""The songs' stored embeddings across every index shard's store and archive, for the jobs that read them
(retraining, the feedback consumer's listener taste)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from indexes.archive import EmbeddingArchive
from indexes.base import StoredEmbedding
from indexes.sqlite_embeddings import STORE_FILE, SqliteEmbeddingStore
from ranker.errors import ConfigError
from ranker.settings import Settings

__all__ = ["STORE_FILE", "ShardEmbeddings"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class ShardEmbeddings:
    """The songs' stored embeddings across the embedding store of every index shard.

    Each worker writes its own shard (``index.shards``; one directory when unset), and a song
    lives in the shard of the worker that scored it, so a song missing from one is looked up
    in the next; a song past the retention window is looked up in the shards' archives
    (:mod:`indexes.archive`), where the sweep moved its embedding.

    A long-lived one (the feedback consumer's) must see shards that appear later (workers scaled
    out, or one that writes its first record after this opened): a lookup that misses songs finds
    the shard directories again, at most every ``api.index_refresh_s`` (the API's readers find new
    shards as often), and opens the stores and archives that appeared. Open ones stay open.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._stores: list[SqliteEmbeddingStore] = []
        self._archives: list[EmbeddingArchive] = []
        with ExitStack() as opened:  # a store that fails to open closes the ones before it
            self._stores = [opened.enter_context(SqliteEmbeddingStore(p)) for p in self._new_shards()]
            self._closing = opened.pop_all()
        if not self._stores:
            where = ", ".join(str(d) for d in settings.index_shards)
            raise ConfigError(f"no embedding store in {where}: run the worker first")
        self._looked_at = clock()

    def _new_shards(self) -> list[Path]:
        """The store files of the shard directories found now that are not open yet; the archive folders
        not known yet join ``_archives`` (an archive needs no store: it may be created later)."""
        shards = self._settings.index_shards
        shared = self._settings.retention.archive_dir  # one folder for every shard (files are named by store)
        known = {a.dir for a in self._archives}
        for folder in [shared] if shared is not None else [d / "archive" for d in shards]:
            if folder not in known:
                self._archives.append(EmbeddingArchive(folder))
                known.add(folder)
        opened = set(self.paths)
        return [d / STORE_FILE for d in shards if d / STORE_FILE not in opened and (d / STORE_FILE).is_file()]

    def _discover(self) -> tuple[list[SqliteEmbeddingStore], list[EmbeddingArchive]]:
        """The stores and archives of shards that appeared since the last look, when that look is
        ``api.index_refresh_s`` old (so a song that no shard has costs one glob that often)."""
        now = self._clock()
        if now - self._looked_at < self._settings.api.index_refresh_s:
            return [], []
        self._looked_at = now
        n_stores, n_archives = len(self._stores), len(self._archives)
        for path in self._new_shards():
            try:
                store = SqliteEmbeddingStore(path)
            except (sqlite3.Error, OSError) as exc:  # its worker may be creating it: tried again at the next look
                log.warning("embedding store %s not opened: %s", path, exc)
                continue
            self._closing.callback(store.close)
            self._stores.append(store)
        added = self._stores[n_stores:], self._archives[n_archives:]
        if added[0]:
            log.info("shard embeddings: new stores %s", [str(s.path) for s in added[0]])
        return added

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self._stores]

    def get_many(self, song_ids: Sequence[str]) -> dict[str, StoredEmbedding]:
        """The stored records among ``song_ids``, from whichever shard holds each."""
        return self._lookup(song_ids, lambda stored: stored, EmbeddingArchive.get_many)

    def index_vectors(self, song_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors the FAISS index holds for ``song_ids`` (a stored record's ``vector``, which
        :class:`indexes.EmbeddingIndex` upserts as it is), for those any shard or archive has."""
        return self._lookup(song_ids, lambda stored: stored.record.vector, EmbeddingArchive.vectors)

    def _lookup(
        self,
        song_ids: Sequence[str],
        from_store: Callable[[StoredEmbedding], _T],
        from_archive: Callable[[EmbeddingArchive, list[str]], Mapping[str, _T]],
    ) -> dict[str, _T]:
        """Each song from the first store that has it, else from an archive (``from_archive`` reads
        only what the caller returns); songs still missing are looked for in shards that appeared."""
        found: dict[str, _T] = {}
        stores, archives = self._stores, self._archives
        while stores or archives:
            for store in stores:
                if missing := [s for s in song_ids if s not in found]:
                    found.update((s, from_store(v)) for s, v in store.get_many(missing).items())
            for archive in archives:
                if missing := [s for s in song_ids if s not in found]:
                    found.update(from_archive(archive, missing))
            if all(s in found for s in song_ids):
                break
            stores, archives = self._discover()  # only the new ones: the others were just asked
        return found

    def archived_metadata(self, song_ids: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        """Generator and creation time of archived songs (for those whose shrunk hash has gone too)."""
        out: dict[str, tuple[str, datetime]] = {}
        for archive in self._archives:
            missing = [s for s in song_ids if s not in out]
            if not missing:
                break
            for song_id, meta in archive.metadata(missing).items():
                if meta.generator and meta.created_at:
                    out[song_id] = (meta.generator, datetime.fromisoformat(meta.created_at))
        return out

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> ShardEmbeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
