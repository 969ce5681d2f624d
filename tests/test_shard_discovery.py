"""The API's index reader finds the shards of workers started after it (scale-out), without a restart,
and lets go of a shard whose directory was deleted (its songs leave similar-song search)."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import suppress
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexes.index_reader import IndexReader, ShardedIndexReader
from ranker import stores
from ranker.serving.api import create_app
from ranker.settings import IndexSettings, Settings
from tests.test_api import reload_index, with_admin
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


def _held_open(directory: Path) -> list[str]:
    """The files under ``directory`` this process holds open (a deleted one reads "... (deleted)")."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [h for h in held if h.startswith(str(directory))]


def test_a_deleted_shard_leaves_search_and_readiness_and_its_files_are_closed(tmp_path: Path) -> None:
    with open_index(tmp_path / "shard-0") as index:
        index.add(records(10, seed=1, prefix="w0"))
    with open_index(tmp_path / "shard-1") as index:
        index.add(records(6, seed=2, prefix="w1"))
    reader = stores.index_reader(_settings(tmp_path, [str(tmp_path / "shard-*")]))
    assert isinstance(reader, ShardedIndexReader)
    try:
        reader.load()
        assert any(sid.startswith("w1-") for sid, _ in reader.similar("w0-2", 15))
        gone = reader.readers[1]
        assert gone.directory == tmp_path / "shard-1" and _held_open(gone.directory)
        shutil.rmtree(tmp_path / "shard-1")  # the operator deletes a scaled-away worker's shard
        # The shard's own refresh thread may run before the discovery: it drops the store, and searches
        # over every shard go on without it.
        gone.refresh()
        assert not gone.status().ready and gone.status().vectors == 0
        assert _held_open(gone.directory) == []
        hits = [sid for sid, _ in reader.similar("w0-2", 15)]
        assert len(hits) == 9 and not any(sid.startswith("w1-") for sid in hits)
        reader.refresh()  # the discovery: the glob no longer finds it, so it no longer counts
        assert [r.directory for r in reader.readers] == [tmp_path / "shard-0"]
        status = reader.status()
        assert status.ready and status.vectors == 10 and status.reason is None
        with pytest.raises(KeyError):
            reader.similar("w1-0", 3)
        # The worker scales back up and writes its shard again: it joins as a new shard.
        with open_index(tmp_path / "shard-1") as index:
            index.add(records(3, seed=3, prefix="w1b"))
        reader.refresh()
        assert reader.status().ready and reader.status().vectors == 13
        assert set(reader.vectors(["w1b-2", "w1-0"])) == {"w1b-2"}
        # Every shard deleted: the last one stays, not ready, as at a start with none.
        shutil.rmtree(tmp_path / "shard-0")
        shutil.rmtree(tmp_path / "shard-1")
        reader.refresh()
        status = reader.status()
        assert len(reader.readers) == 1 and not status.ready and status.vectors == 0
        assert status.reason is not None and "no embedding store" in status.reason
        assert _held_open(tmp_path) == []
        with pytest.raises(LookupError) as raised:  # the API answers 503, not 404
            reader.similar("w0-2", 3)
        assert not isinstance(raised.value, KeyError)
    finally:
        reader.close()


def test_a_deleted_listed_shard_is_closed_and_reported(tmp_path: Path) -> None:
    """Named directories are the configuration: one deleted stops being searched and makes the reader
    not ready (saying which), and a single reader stops answering, until the setting drops it."""
    for name, seed in (("a", 7), ("b", 8)):
        with open_index(tmp_path / name) as index:
            index.add(records(4, seed=seed, prefix=name))
    reader = stores.index_reader(_settings(tmp_path, [str(tmp_path / "a"), str(tmp_path / "b")]))
    single = IndexReader(tmp_path / "b")
    try:
        reader.load()
        assert single.load().ready and any(s.startswith("b-") for s, _ in reader.similar("a-0", 7))
        shutil.rmtree(tmp_path / "b")
        reader.refresh()
        single.refresh()
        status = reader.status()
        assert not status.ready and status.vectors == 4
        assert status.reason is not None and f"{tmp_path / 'b'}: no embedding store" in status.reason
        assert [s for s, _ in reader.similar("a-0", 7)] and not any(
            s.startswith("b-") for s, _ in reader.similar("a-0", 7)
        )
        assert not single.ready and single.status().vectors == 0
        with pytest.raises(LookupError):
            single.similar("b-0", 3)
        assert _held_open(tmp_path / "b") == []
    finally:
        reader.close()
        single.close()


def test_the_api_stops_serving_a_deleted_shard_and_stays_ready(settings: Settings, tmp_path: Path) -> None:
    """What deploy/README.md promises of a deleted shard, through the HTTP API on the real Redis."""
    index = IndexSettings(factory="Flat", shards=[str(tmp_path / "shard-*")])
    s = with_admin(settings.model_copy(update={"index": index}))
    with open_index(tmp_path / "shard-0") as writer:
        writer.add(records(10, seed=1, prefix="w0"))
    with open_index(tmp_path / "shard-1") as writer:
        writer.add(records(6, seed=2, prefix="w1"))
    with TestClient(create_app(s)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index"]["vectors"] == 16
        items = client.get("/v1/songs/w0-2/similar", params={"k": 15}).json()["items"]
        assert any(i["song_id"].startswith("w1-") for i in items)
        shutil.rmtree(tmp_path / "shard-1")
        assert reload_index(client)["vectors"] == 10  # or the next refresh (api.index_refresh_s)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index"] == {
            "ready": True,
            "vectors": 10,
            "source": ready.json()["index"]["source"],
            "reason": None,
        }
        items = client.get("/v1/songs/w0-2/similar", params={"k": 15}).json()["items"]
        assert len(items) == 9 and not any(i["song_id"].startswith("w1-") for i in items)
        assert client.get("/v1/songs/w1-0/similar").status_code == 404
        assert _held_open(tmp_path / "shard-1") == []
