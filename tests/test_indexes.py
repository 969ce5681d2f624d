"""The embedding store, the FAISS index and the EmbeddingIndex that ties them, on real files.

No mocks: SQLite and FAISS run for real; write failures come from a missing
directory or from the kernel (RLIMIT_FSIZE), never from a patched library.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from indexes import (
    EmbeddingIndex,
    EmbeddingRecord,
    FaissIndexConfig,
    FaissVectorIndex,
    KeyCollisionError,
    SnapshotError,
    SqliteEmbeddingStore,
    StoredEmbedding,
    faiss_id,
)
from indexes.embedding_index import INDEX_FILE, META_FILE, STORE_FILE
from indexes.faiss_config import auto_factory
from indexes.faiss_index import gpu_count
from indexes.index_reader import IndexReader, open_index_reader

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def record(
    song_id: str, vector: np.ndarray, encoder_id: str = "enc-a", layers: np.ndarray | None = None
) -> EmbeddingRecord:
    if layers is None:
        layers = np.stack([vector, -vector, vector * 0.5]).astype(np.float32)
    return EmbeddingRecord(
        song_id=song_id, encoder_id=encoder_id, layers=layers, vector=vector, n_segments=2, n_frames=150
    )


def records(n: int, seed: int = 0, prefix: str = "song") -> list[EmbeddingRecord]:
    vectors = unit(np.random.default_rng(seed), n)
    return [record(f"{prefix}-{i}", vectors[i]) for i in range(n)]


# -- SqliteEmbeddingStore ---------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteEmbeddingStore]:
    s = SqliteEmbeddingStore(tmp_path / "e.sqlite")
    yield s
    s.close()


def test_store_is_durable_across_reopen(tmp_path: Path) -> None:
    recs = records(5)
    with SqliteEmbeddingStore(tmp_path / "e.sqlite") as s:
        s.put_many(recs)
    with SqliteEmbeddingStore(tmp_path / "e.sqlite") as s:
        assert s.count() == 5 and s.max_seq() == 5
        got = s.get("song-3")
        assert got is not None and got.key == faiss_id("song-3")
        np.testing.assert_array_equal(got.record.vector, recs[3].vector)
        np.testing.assert_array_equal(got.record.layers, recs[3].layers)
        assert got.record.layers.shape == (3, DIM) and got.record.n_frames == 150
        assert s.contains(["song-1", "nope", "song-4"]) == {"song-1", "song-4"}
        assert set(s.get_many(["song-0", "song-2", "nope"])) == {"song-0", "song-2"}
        assert s.encoder_ids() == {"enc-a"} and s.vector_dims() == {DIM}
        assert s.get("nope") is None
        assert s.song_ids_for_keys([faiss_id("song-2"), 12345]) == {faiss_id("song-2"): "song-2"}


def test_identical_put_keeps_seq_and_changed_put_bumps_it(store: SqliteEmbeddingStore) -> None:
    recs = records(4)
    assert store.put_many_changed(recs) == {f"song-{i}": i + 1 for i in range(4)}
    assert store.put_many_changed(recs) == {}  # a replay: nothing changes
    assert store.max_seq() == 4 and list(store.iter_since(4)) == []

    moved = record("song-1", -recs[1].vector)
    relayered = record("song-2", recs[2].vector, layers=np.zeros((2, DIM), np.float32) + 0.5)
    reencoded = record("song-3", recs[3].vector, encoder_id="enc-b")
    store.put_many([moved, relayered, reencoded, recs[0]])
    assert store.max_seq() == 7
    since = list(store.iter_since(4))
    assert [s.record.song_id for s in since] == ["song-1", "song-2", "song-3"]
    assert [s.seq for s in since] == [5, 6, 7]
    np.testing.assert_array_equal(since[0].record.vector, -recs[1].vector)
    assert since[1].record.layers.shape == (2, DIM)
    assert store.encoder_ids() == {"enc-a", "enc-b"} and store.count() == 4


def test_last_record_of_a_song_wins_within_a_batch(store: SqliteEmbeddingStore) -> None:
    a, b = records(2)
    store.put_many([record("x", a.vector), record("x", b.vector)])
    got = store.get("x")
    assert got is not None and store.count() == 1
    np.testing.assert_array_equal(got.record.vector, b.vector)


def test_key_collision_is_refused_and_the_batch_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite"
    with SqliteEmbeddingStore(path) as s:
        s.put_many(records(1, prefix="seed"))
    # Forge a different song that owns the key of "victim" (a real BLAKE2b collision is out of reach).
    raw = sqlite3.connect(path)
    raw.execute(
        "INSERT INTO embeddings(song_id, key, seq, encoder_id, layers, n_layers, layer_dim, vector, "
        "n_segments, n_frames, updated_at) SELECT 'forged', ?, 99, encoder_id, layers, n_layers, layer_dim, "
        "vector, n_segments, n_frames, updated_at FROM embeddings LIMIT 1",
        (faiss_id("victim"),),
    )
    raw.commit()
    raw.close()
    with SqliteEmbeddingStore(path) as s:
        before = s.max_seq()
        batch = [*records(2, seed=3, prefix="fine"), records(1, prefix="victim")[0]]
        batch[-1] = record("victim", batch[-1].vector)
        with pytest.raises(KeyCollisionError, match="forged"):
            s.put_many(batch)
        assert s.contains(["fine-0", "fine-1", "victim"]) == set()  # all or nothing
        assert s.max_seq() == before


def test_iter_since_streams_in_sequence_order(store: SqliteEmbeddingStore) -> None:
    store.put_many(records(25))
    all_rows = list(store.iter_since(0, batch_size=4))
    assert [r.seq for r in all_rows] == list(range(1, 26))
    assert [r.record.song_id for r in store.iter_since(20, batch_size=2)] == [f"song-{i}" for i in range(20, 25)]
    with pytest.raises(ValueError):
        list(store.iter_since(0, batch_size=0))


@pytest.mark.parametrize(
    ("vector", "layers", "match"),
    [
        (np.zeros(DIM, np.float64), np.zeros((2, DIM), np.float32), "float32"),
        (np.full(DIM, np.nan, np.float32), np.zeros((2, DIM), np.float32), "NaN"),
        (np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), "2-D"),
        (np.zeros((1, DIM), np.float32), np.zeros((2, DIM), np.float32), "1-D"),
    ],
)
def test_store_rejects_malformed_arrays(
    store: SqliteEmbeddingStore, vector: np.ndarray, layers: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        store.put_many([EmbeddingRecord("bad", "enc", layers, vector, 1, 1)])
    assert store.count() == 0


# -- FaissVectorIndex -------------------------------------------------------------------------
FACTORIES = [
    pytest.param({"factory": "Flat"}, id="flat"),
    pytest.param({"factory": "HNSW16", "ef_search": 64}, id="hnsw"),
    pytest.param({"factory": "IVF4,Flat", "nprobe": 4, "train_size": 64}, id="ivf"),
]


def make_index(**kwargs: object) -> FaissVectorIndex:
    return FaissVectorIndex(FaissIndexConfig(dim=DIM, use_gpu="never", **kwargs))


@pytest.mark.parametrize("kwargs", FACTORIES)
def test_upsert_replaces_search_finds_remove_drops(kwargs: dict[str, object]) -> None:
    rng = np.random.default_rng(1)
    index = make_index(**kwargs)
    keys = np.arange(1, 201, dtype=np.int64) * 1_000_003
    vectors = unit(rng, 200)
    index.upsert(keys[:100], vectors[:100])
    index.upsert(keys[100:], vectors[100:])
    assert index.is_trained and index.pending == 0 and index.ntotal == 200
    sims, found = index.search(vectors[:10], 3)
    assert found.shape == (10, 3) and found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], keys[:10])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)

    # Upsert of existing keys: the count stays, the new vectors are what is found.
    fresh = unit(rng, 5)
    index.upsert(keys[:5], fresh)
    assert index.ntotal == 200
    sims, found = index.search(fresh, 1)
    np.testing.assert_array_equal(found[:, 0], keys[:5])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    recon = index.reconstruct(int(keys[0]))
    assert recon is not None
    np.testing.assert_allclose(recon, fresh[0], atol=1e-6)
    assert sorted(index.keys().tolist()) == sorted(keys.tolist())

    # Remove: gone from keys, from search and from reconstruct; absent keys are ignored.
    assert index.remove(np.concatenate([keys[10:15], [7, 9]])) == 5
    assert index.ntotal == 195
    assert set(index.keys().tolist()) == set(keys.tolist()) - set(keys[10:15].tolist())
    _, found = index.search(vectors[10:15], 5)
    assert not set(found.ravel().tolist()) & set(keys[10:15].tolist())
    assert index.reconstruct(int(keys[10])) is None
    assert index.remove(np.array([], dtype=np.int64)) == 0

    # Many at once: one batched read, or one by one when a key is absent; the same vectors.
    for asked in (keys[20:30], np.concatenate([keys[20:25], keys[10:11], keys[25:30]])):
        many = index.reconstruct_many(asked)
        assert list(many) == [k for k in asked.tolist() if k != int(keys[10])]
        for key, vec in many.items():
            np.testing.assert_array_equal(vec, index.reconstruct(key))


def test_hnsw_is_not_removable_but_rebuilds_exactly() -> None:
    index = make_index(factory="HNSW16", ef_search=64)
    assert not index.removable
    vectors = unit(np.random.default_rng(2), 50)
    index.upsert(np.arange(50), vectors)
    index.upsert(np.array([3]), vectors[4:5])  # replace key 3 with key 4's vector
    assert index.ntotal == 50
    np.testing.assert_allclose(index.reconstruct(3), vectors[4], atol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_allclose(index.reconstruct(10), vectors[10], atol=1e-6)  # type: ignore[arg-type]


def test_duplicate_keys_in_one_batch_keep_the_last_vector() -> None:
    index = make_index(factory="Flat")
    vectors = unit(np.random.default_rng(3), 3)
    index.upsert(np.array([5, 6, 5]), vectors)
    assert index.ntotal == 2
    np.testing.assert_allclose(index.reconstruct(5), vectors[2])  # type: ignore[arg-type]


def test_untrained_ivf_buffers_searches_exactly_then_trains() -> None:
    index = make_index(factory="IVF4,Flat", nprobe=4, train_size=80)
    vectors = unit(np.random.default_rng(4), 120)
    index.upsert(np.arange(60), vectors[:60])
    assert not index.is_trained and index.pending == 60 and index.ntotal == 60
    sims, found = index.search(vectors[:3], 4)
    np.testing.assert_array_equal(found[:, 0], [0, 1, 2])
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first
    assert index.remove(np.array([59])) == 1
    index.upsert(np.arange(59, 120), vectors[59:])
    assert index.is_trained and index.pending == 0 and index.ntotal == 120
    _, found = index.search(vectors[100:101], 1)
    assert found[0, 0] == 100


def test_search_pads_missing_slots() -> None:
    index = make_index(factory="Flat")
    sims, keys = index.search(unit(np.random.default_rng(5), 2), 3)
    assert (keys == -1).all() and np.isneginf(sims).all()
    index.upsert(np.array([1]), unit(np.random.default_rng(6), 1))
    sims, keys = index.search(unit(np.random.default_rng(7), 1), 3)
    assert keys[0].tolist()[1:] == [-1, -1] and np.isneginf(sims[0, 1:]).all()


def test_index_validates_shapes_types_and_factories() -> None:
    index = make_index(factory="Flat")
    with pytest.raises(ValueError, match="shape"):
        index.upsert(np.array([1]), np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="float32"):
        index.upsert(np.array([1]), np.zeros((1, DIM), np.float64))
    with pytest.raises(ValueError, match=">= 0"):
        index.upsert(np.array([-1]), np.zeros((1, DIM), np.float32))
    with pytest.raises(ValueError, match="keys for"):
        index.upsert(np.array([1, 2]), np.zeros((1, DIM), np.float32))
    with pytest.raises(ValueError, match="k must"):
        index.search(np.zeros(DIM, np.float32), 0)
    with pytest.raises(ValueError, match="IDMap"):
        make_index(factory="IDMap2,Flat")
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        make_index(factory="NotAFactory42")
    with pytest.raises(ValueError):
        FaissIndexConfig(dim=DIM, nonsense=1)  # type: ignore[call-arg]


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is visible")
def test_use_gpu_always_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="sees no GPU"):
        FaissVectorIndex(FaissIndexConfig(dim=DIM, use_gpu="always"))
    assert not FaissVectorIndex(FaissIndexConfig(dim=DIM, use_gpu="auto")).on_gpu


def test_ivf_save_load_keeps_ids_and_removability(tmp_path: Path) -> None:
    config = FaissIndexConfig(dim=DIM, factory="IVF4,Flat", nprobe=4, train_size=64, use_gpu="never")
    index = FaissVectorIndex(config)
    vectors = unit(np.random.default_rng(8), 100)
    index.upsert(np.arange(100) + 10**12, vectors)
    index.save(tmp_path / "i.faiss")
    loaded = FaissVectorIndex.load(config, tmp_path / "i.faiss")
    assert loaded.ntotal == 100 and loaded.is_trained
    assert loaded.remove(np.array([10**12 + 5])) == 1
    _, found = loaded.search(vectors[7], 1)
    assert found[0, 0] == 10**12 + 7
    with pytest.raises(ValueError, match="dimension"):
        FaissVectorIndex.load(config.model_copy(update={"dim": DIM + 1}), tmp_path / "i.faiss")


# -- EmbeddingIndex -----------------------------------------------------------------------------
def open_index(directory: Path, **kwargs: object) -> EmbeddingIndex:
    options: dict[str, object] = {
        "use_gpu": "never",
        "snapshot_every_songs": 10_000,
        "snapshot_every_s": 3600.0,
    }
    options.update(kwargs)
    return EmbeddingIndex(directory, DIM, **options)  # type: ignore[arg-type]


def test_snapshot_and_reopen(tmp_path: Path) -> None:
    recs = records(30)
    with open_index(tmp_path) as index:
        assert index.open_report.source == "rebuilt" and len(index) == 0
        index.add(recs)
        assert len(index) == 30 and index.watermark == 30
    assert (tmp_path / INDEX_FILE).is_file() and (tmp_path / STORE_FILE).is_file()
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["watermark"] == 30 and meta["ntotal"] == 30 and meta["dim"] == DIM and meta["factory"] == "Flat"
    assert len(meta["sha256"]) == 64 and meta["written_at"]
    with open_index(tmp_path) as index:
        assert index.open_report.source == "snapshot" and index.open_report.replayed == 0
        assert len(index) == 30 and index.contains("song-7") and not index.contains("nope")
        hits = index.search_by_song("song-7", 5)
        assert len(hits) == 5 and "song-7" not in [s for s, _ in hits]
        assert all(a >= b for (_, a), (_, b) in itertools.pairwise(hits))
        top = index.search(recs[7].vector, 1)
        assert top[0][0] == "song-7" and top[0][1] == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(KeyError):
            index.search_by_song("nope", 3)


_CRASHING_WORKER = """
import os, signal, sys
import numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from test_indexes import open_index, record, records
from pathlib import Path
recs = records(20)
index = open_index(Path({directory!r}))
index.add(recs[:12])
index.snapshot()
index.add([*recs[12:], record("song-3", -recs[3].vector), recs[4]])  # 8 new, 1 changed, 1 replayed
assert index.watermark == 21
os.kill(os.getpid(), signal.SIGKILL)  # crash: no close(), no snapshot, the lock dropped by the OS
"""


def test_crash_after_store_write_is_reconciled_without_duplicates(tmp_path: Path) -> None:
    here = Path(__file__).resolve().parent
    code = _CRASHING_WORKER.format(root=str(here.parent), tests=str(here), directory=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 12
    with open_index(tmp_path) as index:
        assert index.open_report.source == "snapshot"
        assert index.open_report.replayed == 9
        assert len(index) == 20 == index.store.count()
        keys = index.vector_index.keys()
        assert len(set(keys.tolist())) == keys.size == 20
        top = index.search(-records(20)[3].vector, 1)
        assert top[0][0] == "song-3" and top[0][1] == pytest.approx(1.0, abs=1e-5)


def test_a_directory_is_opened_once(tmp_path: Path) -> None:
    with open_index(tmp_path), pytest.raises(RuntimeError, match="already open"):
        open_index(tmp_path)
    open_index(tmp_path).close()  # released on close


def test_identical_replay_causes_no_index_churn(tmp_path: Path) -> None:
    recs = records(6)
    with open_index(tmp_path) as index:
        index.add(recs)
        index.snapshot()
        index.add(recs)
        assert index.watermark == 6 and index.store.max_seq() == 6 and len(index) == 6
        assert not index.maybe_snapshot()  # nothing changed since the snapshot


@pytest.mark.parametrize("damage", ["garbage", "flipped-byte", "missing-meta", "missing-index", "bad-meta"])
def test_damaged_snapshot_is_rebuilt_from_the_store(tmp_path: Path, damage: str) -> None:
    recs = records(15)
    with open_index(tmp_path) as index:
        index.add(recs)
    index_file, meta_file = tmp_path / INDEX_FILE, tmp_path / META_FILE
    if damage == "garbage":
        index_file.write_bytes(b"\x00garbage" * 50)
    elif damage == "flipped-byte":
        data = bytearray(index_file.read_bytes())
        data[-5] ^= 0xFF  # inside the vectors: FAISS would read it happily
        index_file.write_bytes(bytes(data))
    elif damage == "missing-meta":
        meta_file.unlink()
    elif damage == "missing-index":
        index_file.unlink()
    else:
        meta_file.write_text("{not json")
    with open_index(tmp_path) as index:
        report = index.open_report
        assert report.source == "rebuilt" and report.replayed == 15
        assert report.reason is not None
        assert ("missing" if damage.startswith("missing") else "corrupt") in report.reason
        assert len(index) == 15
        assert index.search(recs[2].vector, 1)[0][0] == "song-2"
    with open_index(tmp_path) as index:  # the rebuild was snapshotted on close
        assert index.open_report.source == "snapshot"


def _edit_meta(directory: Path, **changes: object) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    meta.update(changes)
    (directory / META_FILE).write_text(json.dumps(meta))


#: Snapshots with sound files but metadata that must not be trusted: (meta changes, reason).
_WRONG_META = [
    pytest.param({"format": 2}, "metadata format 2", id="format"),
    pytest.param({"ntotal": 14}, "meta says 14", id="ntotal"),
    pytest.param({"watermark": 99}, "ahead of the store", id="watermark"),
    pytest.param({"store_uid": 12345}, "another store", id="store-uid"),
]


@pytest.mark.parametrize(("changes", "reason"), _WRONG_META)
def test_snapshot_with_wrong_metadata_is_rebuilt(tmp_path: Path, changes: dict[str, object], reason: str) -> None:
    with open_index(tmp_path) as index:
        index.add(records(15))
    _edit_meta(tmp_path, **changes)
    with open_index(tmp_path) as index:
        assert index.open_report.source == "rebuilt" and reason in (index.open_report.reason or "")
        assert len(index) == 15


def _reader(directory: Path) -> IndexReader:
    reader = IndexReader(directory)
    reader.load()
    return reader


def test_reader_loads_the_writers_snapshot_and_catches_up(tmp_path: Path) -> None:
    recs = records(20)
    with open_index(tmp_path) as index:
        index.add(recs[:15])
    with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:  # written after the snapshot
        s.put_many(recs[15:])
    reader = _reader(tmp_path)
    try:
        status = reader.status()
        assert status.source == "snapshot" and status.reason is None
        assert status.vectors == 20 and status.watermark == 20
        assert reader.similar("song-17", 3)[0][0] != "song-17"
        assert reader.search(recs[17].vector, 1)[0][0] == "song-17"
    finally:
        reader.close()


def test_sharded_search_counts_a_song_in_two_shards_once(tmp_path: Path) -> None:
    """A song stored by two workers (re-ingested after a rebalance) is one hit, at its best similarity."""
    recs = records(12)
    for shard, part in (("a", recs[:8]), ("b", recs[4:])):  # songs 4-7 in both shards
        with open_index(tmp_path / shard) as index:
            index.add(part)
    reader = open_index_reader([tmp_path / "a", tmp_path / "b"], "Flat")
    reader.load()
    try:
        hits = reader.similar("song-5", 10)
        ids = [sid for sid, _ in hits]
        assert len(ids) == len(set(ids)) == 10 and "song-5" not in ids
        assert [sim for _, sim in hits] == sorted((sim for _, sim in hits), reverse=True)
    finally:
        reader.close()


def test_concurrent_reloads_take_turns(tmp_path: Path) -> None:
    """The refresh thread and POST /v1/index/reload may load at once: the second waits, rather than
    close the store the first one's catch-up is still reading."""
    with open_index(tmp_path) as index:
        index.add(records(50))
    with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:
        s.put_many(records(6000, seed=1, prefix="late"))  # a catch-up of two batches after each load
    reader = _reader(tmp_path)
    first_paused, second_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    apply = reader._apply

    def watched(store: SqliteEmbeddingStore, batch: list[StoredEmbedding]) -> int:
        n = apply(store, batch)
        if threading.current_thread().name == "first" and not first_paused.is_set():
            first_paused.set()
            second_done.wait(3)  # the second load runs now, unless it has to wait its turn
        return n

    def load() -> None:
        try:
            reader.load()
        except BaseException as exc:
            errors.append(exc)

    reader._apply = watched  # type: ignore[method-assign]
    first = threading.Thread(target=load, name="first")
    second = threading.Thread(target=load, name="second")
    try:
        first.start()
        assert first_paused.wait(30)
        second.start()
        second.join(1.0)
        if not second.is_alive():
            second_done.set()
        first.join(60)
        second.join(60)
        assert not errors, errors
        assert reader.status().vectors == 6050
    finally:
        second_done.set()
        reader.close()


def test_a_search_begun_before_a_reload_never_reads_the_store_the_reload_closed(tmp_path: Path) -> None:
    """A similar-songs search holds the store it started with until it has named its hits; a reload
    (the refresh thread, POST /v1/index/reload) swaps in a new store and closes the old one. The
    search pauses on its hits' names while the reload runs: the reload must wait for it, not close
    the store under it (which answered the request with a 500)."""
    with open_index(tmp_path) as index:
        index.add(records(50))
    reader = _reader(tmp_path)
    paused, reloaded = threading.Event(), threading.Event()
    old_store = reader._store
    assert old_store is not None
    names = old_store.song_ids_for_keys

    def slow_names(keys: Iterable[int]) -> dict[int, str]:
        paused.set()
        reloaded.wait(1.0)  # the reload finishes now, unless it has to wait for this search
        return names(keys)

    old_store.song_ids_for_keys = slow_names  # type: ignore[method-assign]
    reload = threading.Thread(target=lambda: (reader.load(), reloaded.set()))
    try:
        vector = reader.vector_of("song-1")
        assert vector is not None
        found: list[list[tuple[str, float]]] = []
        search = threading.Thread(target=lambda: found.append(reader.search(vector, 5)))
        search.start()
        assert paused.wait(30)
        reload.start()
        search.join(30)
        reload.join(30)
        assert found and found[0][0][0] == "song-1", found
        assert reader._store is not old_store  # the reload did happen
    finally:
        reloaded.set()
        reader.close()


def test_deletions_leave_the_writers_index_and_every_reader(tmp_path: Path) -> None:
    """Takedown and retention delete from the store; the worker's index and every API reader drop the
    vectors by catching up with the deletion records, in sequence order with the upserts."""
    recs = records(12)

    def top(found: list[tuple[str, float]]) -> str:
        return found[0][0]

    with open_index(tmp_path) as index:
        index.add(recs[:10])
        reader = _reader(tmp_path)
        try:
            assert index.delete(["song-1", "song-2", "absent"]) == {"song-1": 11, "song-2": 12}
            assert len(index) == 8 and top(index.search(recs[1].vector, 1)) != "song-1"
            assert reader.refresh() == 2 and reader.status().vectors == 8 and reader.status().watermark == 12
            assert top(reader.search(recs[2].vector, 1)) != "song-2" and "song-2" not in reader.vectors(["song-2"])
            # Another writer of the store (the takedown handler given the store), then a re-add: replayed in order.
            with SqliteEmbeddingStore(tmp_path / STORE_FILE) as other:
                other.delete(["song-3"])
                other.put_many([recs[1]])  # stored again after its deletion
            index.add(recs[10:])  # not the next numbers: the index catches up with both
            assert len(index) == 10 and top(index.search(recs[1].vector, 1)) == "song-1"
            assert top(index.search(recs[3].vector, 1)) != "song-3"
            assert reader.refresh() == 4 and reader.status().vectors == 10
            assert top(reader.search(recs[3].vector, 1)) != "song-3"
        finally:
            reader.close()
    with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:  # after the last snapshot
        s.delete(["song-4"])
    with open_index(tmp_path) as index:  # the snapshot, then the deletion replayed: no rebuild needed
        assert index.open_report.source == "snapshot" and index.open_report.replayed == 1 and len(index) == 9


def test_a_snapshot_behind_pruned_deletions_is_rebuilt_and_readers_reload(tmp_path: Path) -> None:
    recs = records(10)
    with open_index(tmp_path) as index:
        index.add(recs)
    behind = _reader(tmp_path)  # at the snapshot's watermark, 10
    try:
        with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:
            s.delete(["song-0"])
            assert s.prune_deletions(float("inf"), through_seq=11) == 1  # its removal is no longer recorded
        assert behind.refresh() == 9 and behind.status().source == "store"  # reloaded whole, and right
        assert behind.status().watermark == 11 and behind.refresh() == 0  # no reload loop afterwards
        with open_index(tmp_path) as index:
            assert index.open_report.source == "rebuilt" and "pruned" in (index.open_report.reason or "")
            assert len(index) == 9 and index.watermark == 11
            index.snapshot()
        with open_index(tmp_path) as index:  # the new snapshot is at the pruned horizon: used
            assert index.open_report.source == "snapshot" and len(index) == 9
            assert index.prune_deletions(float("inf")) == 0
    finally:
        behind.close()


def test_the_writer_prunes_only_deletions_its_snapshot_covers(tmp_path: Path) -> None:
    with open_index(tmp_path) as index:
        index.add(records(4))
        index.snapshot()
        index.delete(["song-0"])
        assert index.prune_deletions(float("inf")) == 0  # the snapshot on disk is at 4, the deletion 5
        index.snapshot()
        assert index.prune_deletions(float("inf")) == 1 and index.store.deletions_pruned_through() == 5


def test_reader_reads_between_the_batches_of_a_catch_up(tmp_path: Path) -> None:
    """A catch-up holds the write lock per batch, not throughout: the API's page reads (on its
    event loop) wait for one batch's upsert at most."""
    from indexes.snapshots import REPLAY_BATCH

    recs = records(REPLAY_BATCH + 10)
    with open_index(tmp_path) as index:
        index.add(recs[:5])
    reader = _reader(tmp_path)
    with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:
        s.put_many(recs[5:])  # two batches to catch up
    first_applied, read_done = threading.Event(), threading.Event()
    applied: list[int] = []
    apply = reader._apply

    def watched(store: SqliteEmbeddingStore, batch: list[StoredEmbedding]) -> int:
        n = apply(store, batch)
        applied.append(n)
        if len(applied) == 1:
            first_applied.set()
            read_done.wait(10)  # the second batch waits for a read made in between
        return n

    reader._apply = watched  # type: ignore[method-assign]
    refresh = threading.Thread(target=reader.refresh)
    refresh.start()
    try:
        assert first_applied.wait(10)
        got = reader.vectors(["song-0", f"song-{REPLAY_BATCH + 9}"])
        assert len(applied) == 1 and set(got) == {"song-0"}  # read between the batches
        read_done.set()
        refresh.join(10)
        assert applied == [REPLAY_BATCH, 5] and reader.status().vectors == REPLAY_BATCH + 10
    finally:
        read_done.set()
        refresh.join(10)
        reader.close()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        *_WRONG_META,
        pytest.param({"sha256": "0" * 64}, "sha256", id="sha256"),
        pytest.param({"bytes": 1}, "meta says 1", id="bytes"),
        pytest.param({"dim": "x"}, "corrupt snapshot metadata", id="bad-meta"),
    ],
)
def test_reader_refuses_a_snapshot_the_writer_would_refuse(
    tmp_path: Path, changes: dict[str, object], reason: str
) -> None:
    """The reader accepts a snapshot on the writer's checks and otherwise builds from the store."""
    recs = records(15)
    with open_index(tmp_path) as index:
        index.add(recs)
    _edit_meta(tmp_path, **changes)
    reader = _reader(tmp_path)
    try:
        status = reader.status()
        assert status.source == "store" and reason in (status.reason or "")
        assert status.ready and status.vectors == 15 and status.watermark == 15
        assert reader.search(recs[2].vector, 1)[0][0] == "song-2"
    finally:
        reader.close()


def test_mismatched_factory_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_index(tmp_path) as index:
        index.add(records(8))
    with caplog.at_level(logging.WARNING), open_index(tmp_path, factory="HNSW16") as index:
        assert index.open_report.source == "rebuilt" and "mismatched" in (index.open_report.reason or "")
        assert len(index) == 8
    assert "mismatched" in caplog.text


def _remove_store(directory: Path) -> None:
    for name in os.listdir(directory):
        if name.startswith(STORE_FILE):
            (directory / name).unlink()


def test_replaced_or_restored_store_rebuilds(tmp_path: Path) -> None:
    directory = tmp_path / "idx"
    with open_index(directory) as index:
        index.add(records(5))
        with sqlite3.connect(tmp_path / "backup.sqlite") as backup:
            raw = sqlite3.connect(directory / STORE_FILE)
            raw.backup(backup)
            raw.close()
        index.add(records(5, seed=1, prefix="late"))
    # Restored from an older backup (same store uid): the snapshot is ahead of it.
    _remove_store(directory)
    (directory / STORE_FILE).write_bytes((tmp_path / "backup.sqlite").read_bytes())
    with open_index(directory) as index:
        assert index.open_report.source == "rebuilt" and "ahead" in (index.open_report.reason or "")
        assert len(index) == 5 and not index.contains("late-0")
    # A brand-new store file: the snapshot belongs to another store.
    _remove_store(directory)
    with open_index(directory) as index:
        assert index.open_report.source == "rebuilt" and "another store" in (index.open_report.reason or "")
        assert len(index) == 0


class _BrokenTempDir(EmbeddingIndex):
    """Writes snapshot temp files into a directory that does not exist."""

    def _temp_path(self, final: Path) -> Path:
        return final.parent / "no-such-dir" / final.name


def test_failed_snapshot_leaves_the_previous_one_valid(tmp_path: Path) -> None:
    recs = records(12)
    with open_index(tmp_path) as index:
        index.add(recs[:8])
    before = (tmp_path / INDEX_FILE).read_bytes(), (tmp_path / META_FILE).read_bytes()
    broken = _BrokenTempDir(tmp_path, DIM, use_gpu="never", snapshot_every_songs=2, snapshot_every_s=3600)
    broken.add(recs[8:])  # maybe_snapshot fails: logged, not raised (the store has the records)
    with pytest.raises(SnapshotError, match="previous snapshot is intact"):
        broken.snapshot()
    with pytest.raises(SnapshotError):
        broken.close()
    assert ((tmp_path / INDEX_FILE).read_bytes(), (tmp_path / META_FILE).read_bytes()) == before
    with open_index(tmp_path) as index:
        assert index.open_report.source == "snapshot" and index.open_report.replayed == 4
        assert len(index) == 12


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_FSIZE")
def test_disk_full_during_snapshot_raises_and_keeps_old_snapshot(tmp_path: Path) -> None:
    import resource

    with open_index(tmp_path) as index:
        index.add(records(10))
    before = (tmp_path / INDEX_FILE).read_bytes()
    index = open_index(tmp_path)
    index.add(records(200, seed=9, prefix="more"))
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the kernel refuses bytes past 4 KiB
    try:
        with pytest.raises(SnapshotError) as caught:
            index.snapshot()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(caught.value.__cause__, OSError)
    assert (tmp_path / INDEX_FILE).read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    index.close()  # with room again, the final snapshot succeeds
    with open_index(tmp_path) as reopened:
        assert reopened.open_report.source == "snapshot" and len(reopened) == 210


def test_snapshots_every_n_songs_or_t_seconds(tmp_path: Path) -> None:
    now = [0.0]
    index = open_index(tmp_path, snapshot_every_songs=5, snapshot_every_s=10.0, clock=lambda: now[0])
    try:
        index.add(records(3))
        assert not (tmp_path / META_FILE).exists()
        index.add(records(2, prefix="b"))
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 5
        index.add(records(1, prefix="c"))
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 5
        now[0] = 11.0
        assert index.maybe_snapshot()
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 6
        # Once a tenth of the index is more than snapshot_every_songs, that tenth is the count.
        index.add(records(94, prefix="d"))  # 100 vectors, then due after a tenth of the index, not 5
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 100
        index.add(records(10, prefix="e"))  # 110 vectors: 10 changes < 11
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 100
        index.add(records(1, prefix="f"))  # 111 vectors: 11 changes
        assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 111
    finally:
        index.close()


def test_untrained_ivf_snapshot_replays_its_buffer(tmp_path: Path) -> None:
    kwargs = {"factory": "IVF4,Flat", "nprobe": 4, "train_size": 50}
    recs = records(70)
    with open_index(tmp_path, **kwargs) as index:
        index.add(recs[:30])
        assert not index.vector_index.is_trained
    assert json.loads((tmp_path / META_FILE).read_text())["watermark"] == 0
    with open_index(tmp_path, **kwargs) as index:
        assert index.open_report.source == "snapshot" and index.open_report.replayed == 30
        assert len(index) == 30 and index.search(recs[4].vector, 1)[0][0] == "song-4"
        index.add(recs[30:])
        assert index.vector_index.is_trained and len(index) == 70
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["watermark"] == 70 and meta["trained"]
    with open_index(tmp_path, **kwargs) as index:
        assert index.open_report.replayed == 0 and len(index) == 70
        assert index.search_by_song("song-40", 3)[0][0] != "song-40"


def test_add_rejects_wrong_dimension_before_storing(tmp_path: Path) -> None:
    with open_index(tmp_path) as index:
        bad = record("wide", unit(np.random.default_rng(0), 1, DIM + 2)[0])
        with pytest.raises(ValueError, match="vector shape"):
            index.add([bad])
        assert index.store.count() == 0
    with SqliteEmbeddingStore(tmp_path / STORE_FILE) as s:
        s.put_many([bad])
    with pytest.raises(ValueError, match="another index directory"):
        open_index(tmp_path)


# -- factory "auto" ----------------------------------------------------------------------------
def test_auto_factory_picks_by_size() -> None:
    assert auto_factory(0) == ("Flat", None) and auto_factory(100_000) == ("Flat", None)
    assert auto_factory(200_000) == ("IVF2048,Flat", 32)
    assert auto_factory(1_000_000) == ("IVF4096,Flat", 64)
    assert auto_factory(10_000_000) == ("IVF16384,SQ8", 256)
    index = make_index(factory="auto", expected_size=1_000_000)
    assert index.config.factory == "IVF4096,Flat" and index.config.nprobe == 64
    assert index.removable and not index.is_trained and index.train_size == 39 * 4096
    assert make_index(factory="auto", expected_size=1_000_000, nprobe=7).config.nprobe == 7  # a set nprobe stays
    assert make_index(factory="auto").config.factory == "Flat"


def test_auto_index_trains_on_a_sample_and_keeps_its_type(tmp_path: Path) -> None:
    recs = records(2200, seed=9)
    auto = {"factory": "auto", "train_size": 2100}
    with open_index(tmp_path, expected_size=200_000, **auto) as index:
        assert index.vector_index.config.factory == "IVF2048,Flat"
        index.add(recs[:2000])
        assert not index.vector_index.is_trained and index.vector_index.pending == 2000  # the sample fills
        index.add(recs[2000:])
        assert index.vector_index.is_trained and index.vector_index.pending == 0 and len(index) == 2200
    assert json.loads((tmp_path / META_FILE).read_text())["factory"] == "IVF2048,Flat"
    # Reopened with no expected size (2,200 stored songs would pick Flat): the index keeps its type,
    # and its nprobe (32 of 2,048 lists; with FAISS's default of 1 a query sees about one song).
    with open_index(tmp_path, **auto) as index:
        assert index.open_report.source == "snapshot" and index.vector_index.config.factory == "IVF2048,Flat"
        assert len(index.search(recs[5].vector, 10)) == 10
    reader = IndexReader(tmp_path, "auto")
    try:
        assert reader.load().source == "snapshot" and reader.index_factory == "IVF2048,Flat"
    finally:
        reader.close()
    # Without a usable snapshot the type is picked again, from the store's size (or the expected one).
    (tmp_path / META_FILE).unlink()
    reader = IndexReader(tmp_path, "auto", expected_size=200_000)
    try:
        assert reader.load().source == "store" and reader.index_factory == "IVF2048,Flat"
    finally:
        reader.close()
    with open_index(tmp_path, **auto) as index:
        assert index.open_report.source == "rebuilt" and index.vector_index.config.factory == "Flat"
        assert len(index) == 2200
    # An explicit factory other than the snapshot's is the documented way to switch: a rebuild.
    with open_index(tmp_path, factory="IVF4,Flat", nprobe=4) as index:
        assert index.open_report.source == "rebuilt" and "mismatched" in (index.open_report.reason or "")
        assert index.vector_index.config.factory == "IVF4,Flat" and len(index) == 2200
