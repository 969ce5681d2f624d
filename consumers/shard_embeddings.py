"""The songs' stored embeddings across every index shard's store and archive, for the jobs that read them
(retraining, the feedback consumer's listener taste)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np

from indexes.archive import EmbeddingArchive
from indexes.base import StoredEmbedding
from indexes.sqlite_embeddings import STORE_FILE, SqliteEmbeddingStore
from ranker.errors import ConfigError
from ranker.settings import Settings

__all__ = ["STORE_FILE", "ShardEmbeddings"]


class ShardEmbeddings:
    """The songs' stored embeddings across the embedding store of every index shard.

    Each worker writes its own shard (``index.shards``; one directory when unset), and a song
    lives in the shard of the worker that scored it, so a song missing from one is looked up
    in the next; a song past the retention window is looked up in the shards' archives
    (:mod:`indexes.archive`), where the sweep moved its embedding.
    """

    def __init__(self, settings: Settings) -> None:
        shards = settings.index_shards
        paths = [d / STORE_FILE for d in shards if (d / STORE_FILE).is_file()]
        if not paths:
            where = ", ".join(str(d) for d in shards)
            raise ConfigError(f"no embedding store in {where}: run the worker first")
        with ExitStack() as opened:  # a store that fails to open closes the ones before it
            self._stores = [opened.enter_context(SqliteEmbeddingStore(p)) for p in paths]
            self._closing = opened.pop_all()
        shared = settings.retention.archive_dir  # one folder for every shard (files are named by store)
        folders = [shared] if shared is not None else [d / "archive" for d in shards]
        self._archives = [EmbeddingArchive(d) for d in folders]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self._stores]

    def get_many(self, song_ids: Sequence[str]) -> dict[str, StoredEmbedding]:
        """The stored records among ``song_ids``, from whichever shard holds each."""
        found: dict[str, StoredEmbedding] = {}
        for store in self._stores:
            missing = [s for s in song_ids if s not in found]
            if not missing:
                break
            found.update(store.get_many(missing))
        for archive in self._archives:
            missing = [s for s in song_ids if s not in found]
            if not missing:
                break
            found.update(archive.get_many(missing))
        return found

    def index_vectors(self, song_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors the FAISS index holds for ``song_ids`` (a stored record's ``vector``, which
        :class:`indexes.EmbeddingIndex` upserts as it is), for those any shard or archive has."""
        return {s: stored.record.vector for s, stored in self.get_many(song_ids).items()}

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
