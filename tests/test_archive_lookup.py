"""Looking songs up in the archive and across shards: the feedback consumer does it on every batch with
a like of an expired or unknown song, so it must not read every archive file (which only grow), and
its long-lived :class:`ShardEmbeddings` must see shards that appear after it opened."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from consumers.shard_embeddings import STORE_FILE, ShardEmbeddings
from indexes import EmbeddingArchive, EmbeddingRecord, SqliteEmbeddingStore
from indexes.archive import SongMeta
from indexes.base import StoredEmbedding
from ranker.settings import ApiSettings, IndexSettings, Settings
from tests.test_retention import DAY_S, T0, SimClock, embedding


class CountingArchive(EmbeddingArchive):
    """An archive that records every file read: (file name, columns)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads: list[tuple[str, tuple[str, ...]]] = []

    def _read(self, path: Path, columns: Sequence[str]) -> pa.Table:
        self.reads.append((path.name, tuple(columns)))
        return super()._read(path, columns)


def rows(*songs: tuple[int, str, int]) -> list[tuple[StoredEmbedding, float]]:
    """Archive rows of ``(seq, song, seed)``: the seed picks the embedding, so versions differ."""
    return [(StoredEmbedding(seq, seq, embedding(song, seed)), T0) for seq, song, seed in songs]


def test_a_lookup_reads_only_the_files_that_hold_the_songs(tmp_path: Path) -> None:
    archive = CountingArchive(tmp_path / "archive")
    first = archive.write(rows((1, "a", 1), (2, "b", 2)), T0 + 5, {"a": SongMeta("suno-v5", None, "m-1")})
    second = archive.write(rows((3, "a", 3), (4, "c", 4)), T0 + DAY_S, {"a": SongMeta("udio", None, "m-2")})
    assert first is not None and second is not None and first.parent != second.parent

    got = archive.get_many(["a", "b", "c", "nowhere"])
    assert sorted(got) == ["a", "b", "c"]
    np.testing.assert_array_equal(got["a"].record.layers, embedding("a", 3).layers)  # the newest archived wins
    assert got["a"].seq == 3 and got["b"].seq == 2 and got["c"].seq == 4
    assert archive.metadata(["a", "b", "nowhere"]) == {"a": SongMeta("udio", None, "m-2"), "b": SongMeta()}
    # Each file's ids were read once, by the first lookup.
    assert sorted(r for r in archive.reads if r[1] == ("song_id",)) == [
        (first.name, ("song_id",)),
        (second.name, ("song_id",)),
    ]
    archive.reads.clear()
    vectors = archive.vectors(["a", "c"])
    np.testing.assert_array_equal(vectors["a"], embedding("a", 3).vector)
    np.testing.assert_array_equal(vectors["c"], embedding("c", 4).vector)
    cols = ("song_id", "expired_at", "vector")  # not the layers
    assert archive.reads == [(first.name, cols), (second.name, cols)]  # "a" is in both

    archive.reads.clear()
    assert archive.get_many(["nowhere", "unscored"]) == {} and archive.metadata(["nowhere"]) == {}
    assert archive.vectors(["nowhere"]) == {}
    assert archive.reads == []  # songs in no file: no file read at all, not even its ids again
    archive.get_many(["b"])
    assert [name for name, _ in archive.reads] == [first.name]  # only the file that holds it

    # The first file replaced under its name (a sweep run again): its new ids are read, its old are gone.
    again = archive.write(rows((1, "d", 5), (2, "b", 6)), T0 + 6)
    assert again == first
    archive.reads.clear()
    assert sorted(archive.get_many(["d"])) == ["d"]
    got = archive.get_many(["a", "b", "d"])
    assert sorted(got) == ["a", "b", "d"] and got["b"].seq == 2
    np.testing.assert_array_equal(got["b"].record.vector, embedding("b", 6).vector)
    assert (first.name, ("song_id",)) in archive.reads and (second.name, ("song_id",)) not in archive.reads

    # A file removed (pruned): its songs are gone, and the lookup no longer goes to it.
    second.unlink()
    archive.reads.clear()
    got = archive.get_many(["a", "c", "d"])
    assert sorted(got) == ["d"] and archive.vectors(["c"]) == {}
    assert all(name != second.name for name, _ in archive.reads)


def test_shard_embeddings_find_shards_that_appear_later_on_a_miss(tmp_path: Path) -> None:
    """A song no open shard has looks for new shard directories, at most every ``api.index_refresh_s``;
    the stores already open stay open."""
    clock = SimClock(0.0)
    settings = Settings(
        state_dir=tmp_path / "state",
        index=IndexSettings(shards=[str(tmp_path / "shard-*")]),
        api=ApiSettings(index_refresh_s=10.0),
    )

    def scored(shard: str, record: EmbeddingRecord) -> None:
        with SqliteEmbeddingStore(tmp_path / shard / STORE_FILE) as store:
            store.put_many([record])

    scored("shard-0", embedding("a", 1))
    with ShardEmbeddings(settings, clock=clock) as emb:
        assert sorted(emb.index_vectors(["a", "b"])) == ["a"]
        first = emb.paths
        scored("shard-1", embedding("b", 2))  # a worker scaled out after the lookup above
        EmbeddingArchive(tmp_path / "shard-1" / "archive", store_uid=1).write(rows((9, "c", 3)), T0)

        clock.now = 9.0  # before the interval: the miss costs no look
        assert sorted(emb.index_vectors(["a", "b", "c"])) == ["a"] and emb.paths == first
        clock.now = 10.0
        got = emb.index_vectors(["a", "b", "c"])
        assert sorted(got) == ["a", "b", "c"] and emb.paths == [*first, tmp_path / "shard-1" / STORE_FILE]
        np.testing.assert_array_equal(got["b"], embedding("b", 2).vector)
        np.testing.assert_array_equal(got["c"], embedding("c", 3).vector)
        assert sorted(emb.get_many(["b", "c"])) == ["b", "c"]
