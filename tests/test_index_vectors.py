"""The API's index readers hand a page's vectors over as one matrix, row for row with the keys asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexes.base import faiss_id
from indexes.index_reader import IndexReader, ShardedIndexReader
from ranker import stores
from ranker.settings import IndexSettings, Settings
from tests.test_indexes import DIM, open_index, records


def test_a_matrix_in_the_keys_order_with_zero_rows_for_songs_not_indexed(tmp_path: Path) -> None:
    recs = records(12, seed=5)
    with open_index(tmp_path / "index") as index:
        index.add(recs)
    reader = IndexReader(tmp_path / "index", "Flat")
    try:
        reader.load()
        asked = ["song-7", "song-2", "not-indexed", "song-11", "song-0"]
        found, matrix = reader.vector_matrix([faiss_id(s) for s in asked])
        assert found.tolist() == [True, True, False, True, True]
        assert matrix.shape == (5, DIM) and matrix.dtype == np.float32
        by_id = reader.vectors(asked)
        for i, sid in enumerate(asked):
            expected = by_id.get(sid, np.zeros(DIM, np.float32))
            np.testing.assert_array_equal(matrix[i], expected)
        every, rows = reader.vector_matrix([faiss_id(s) for s in ("song-3", "song-1")])  # all present: in order
        assert every.all()
        np.testing.assert_allclose(rows, np.stack([recs[3].vector, recs[1].vector]), rtol=0, atol=1e-6)
        none, empty = reader.vector_matrix([faiss_id("nobody")])
        assert not none.any() and empty.shape[0] == 1
    finally:
        reader.close()


def test_the_sharded_reader_fills_each_row_from_the_shard_holding_the_song(tmp_path: Path) -> None:
    a, b = records(6, seed=1, prefix="w0"), records(5, seed=2, prefix="w1")
    for name, recs in (("shard-0", a), ("shard-1", b)):
        with open_index(tmp_path / name) as index:
            index.add(recs)
    settings = Settings(
        state_dir=tmp_path / "state", index=IndexSettings(factory="Flat", shards=[str(tmp_path / "shard-*")])
    )
    reader = stores.index_reader(settings)
    assert isinstance(reader, ShardedIndexReader)
    try:
        reader.load()
        asked = ["w1-4", "w0-0", "missing", "w0-5", "w1-0"]
        found, matrix = reader.vector_matrix([faiss_id(s) for s in asked])
        assert found.tolist() == [True, True, False, True, True]
        expected = [b[4].vector, a[0].vector, np.zeros(DIM), a[5].vector, b[0].vector]
        np.testing.assert_allclose(matrix, np.stack(expected), rtol=0, atol=1e-6)
    finally:
        reader.close()


def test_the_mean_direction_follows_vectors_added_replaced_and_removed(tmp_path: Path) -> None:
    """What personal feeds take out of every cosine: the unit mean of what the index holds right now."""

    def unit_mean(vectors: list[np.ndarray]) -> np.ndarray:
        total = np.sum(vectors, axis=0, dtype=np.float64)
        return total / np.linalg.norm(total)

    first = records(10, seed=3)
    with open_index(tmp_path / "index") as index:
        index.add(first)
    reader = IndexReader(tmp_path / "index", "Flat")
    try:
        assert reader.mean_direction() is None  # nothing loaded yet
        reader.load()
        np.testing.assert_allclose(reader.mean_direction(), unit_mean([r.vector for r in first]), atol=1e-6)
        replaced = records(3, seed=9)  # new vectors for song-0..2
        more = records(4, seed=4, prefix="more")
        with open_index(tmp_path / "index") as index:
            index.add(replaced + more)
            index.delete(["song-9"])
        reader.refresh()
        now = [r.vector for r in replaced] + [r.vector for r in first[3:9]] + [r.vector for r in more]
        np.testing.assert_allclose(reader.mean_direction(), unit_mean(now), atol=1e-6)
    finally:
        reader.close()


def test_a_large_batch_with_absent_keys_returns_exactly_the_present_vectors() -> None:
    """Past MEMBERSHIP_BATCH keys, the absent ones are found against the index's keys at once."""
    from indexes.faiss_config import FaissIndexConfig
    from indexes.faiss_index import MEMBERSHIP_BATCH, FaissVectorIndex

    rng = np.random.default_rng(7)
    index = FaissVectorIndex(FaissIndexConfig(dim=DIM, factory="Flat", use_gpu="never"))
    stored = rng.standard_normal((3000, DIM)).astype(np.float32)
    index.upsert(np.arange(3000, dtype=np.int64), stored)
    asked = np.concatenate([np.arange(2500, 3500), np.arange(0, 600, 3)]).astype(np.int64)  # 500 absent
    assert len(asked) >= MEMBERSHIP_BATCH
    found = index.reconstruct_many(asked)
    assert sorted(found) == sorted(k for k in asked.tolist() if k < 3000)
    for key in (2500, 2999, 0, 597):
        np.testing.assert_allclose(found[key], stored[key], rtol=0, atol=1e-6)
    small = index.reconstruct_many(np.array([5, 4000, 7], dtype=np.int64))  # the one-by-one path
    assert sorted(small) == [5, 7]
