"""The API's index reader finds the shards of workers started after it (scale-out), without a restart."""

from __future__ import annotations

import time
from pathlib import Path

from indexes.index_reader import ShardedIndexReader
from ranker import stores
from ranker.settings import IndexSettings, Settings
from tests.test_indexes import open_index, records


def _settings(tmp_path: Path, shards: list[str]) -> Settings:
    return Settings(state_dir=tmp_path / "state", index=IndexSettings(factory="Flat", shards=shards))


def test_a_shard_written_after_the_reader_started_joins_at_the_next_refresh(tmp_path: Path) -> None:
    first, later = records(10, seed=1, prefix="w0"), records(6, seed=2, prefix="w1")
    with open_index(tmp_path / "shard-0") as index:
        index.add(first)
    reader = stores.index_reader(_settings(tmp_path, [str(tmp_path / "shard-*")]))
    assert isinstance(reader, ShardedIndexReader)  # a glob, even matching one directory, keeps looking
    try:
        assert reader.load().vectors == 10
        (tmp_path / "shard-1").mkdir()  # a worker that has not written yet: not joined, and still ready
        reader.refresh()
        status = reader.status()
        assert status.ready and status.vectors == 10 and status.reason is None
        assert reader.vectors(["w1-0"]) == {}
        with open_index(tmp_path / "shard-1") as index:
            index.add(later)
        reader.refresh()
        assert reader.status().vectors == 16 and reader.status().ready
        assert set(reader.vectors(["w1-3", "w0-2"])) == {"w1-3", "w0-2"}
        hits = [sid for sid, _ in reader.similar("w0-2", 16)]  # every other song, from both shards
        assert len(hits) == 15 and {f"w1-{i}" for i in range(6)} <= set(hits)
        assert reader.discover() == []  # known shards do not join twice
        assert len(reader.readers) == 2
    finally:
        reader.close()


def test_the_refresh_thread_finds_new_shards_by_itself(tmp_path: Path) -> None:
    with open_index(tmp_path / "shard-0") as index:
        index.add(records(4, seed=3, prefix="w0"))
    reader = stores.index_reader(_settings(tmp_path, [str(tmp_path / "shard-*")]))
    try:
        reader.load()
        reader.start(0.05)
        with open_index(tmp_path / "shard-1") as index:
            index.add(records(5, seed=4, prefix="w1"))
        deadline = time.monotonic() + 30  # a wait for the condition, not a timing assertion
        while reader.status().vectors < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.status().vectors == 9
        assert set(reader.vectors(["w1-4"])) == {"w1-4"}
    finally:
        reader.close()


def test_listed_shards_without_a_glob_are_fixed(tmp_path: Path) -> None:
    """Named directories are the whole set: a directory beside them is not searched."""
    for name, seed in (("a", 5), ("b", 6)):
        with open_index(tmp_path / name) as index:
            index.add(records(3, seed=seed, prefix=name))
    reader = stores.index_reader(_settings(tmp_path, [str(tmp_path / "a")]))
    try:
        reader.load()
        reader.refresh()
        assert reader.status().vectors == 3 and reader.vectors(["b-0"]) == {}
    finally:
        reader.close()
