"""index.nprobe reaches the API's index readers and the workers' indexes (recall against speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker import stores
from ranker.settings import IndexSettings, Settings
from tests.test_indexes import DIM, open_index, records


def _recall(settings: Settings, vectors: np.ndarray, queries: np.ndarray) -> float:
    reader = stores.index_reader(settings)
    try:
        reader.load()
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        found = 0
        for q, truth in zip(queries, exact, strict=True):
            hits = {int(sid.split("-")[1]) for sid, _ in reader.search(q, 10)}  # type: ignore[union-attr]
            found += len(hits & set(truth.tolist()))
        return found / exact.size
    finally:
        reader.close()


def test_nprobe_setting_is_what_the_reader_searches_with(tmp_path: Path) -> None:
    recs = records(2000, seed=11)
    with open_index(tmp_path / "index", factory="IVF16,Flat", train_size=1000) as index:
        index.add(recs)
    vectors = np.stack([r.vector for r in recs])
    queries = vectors[:40] + 0.05 * np.random.default_rng(12).standard_normal((40, DIM)).astype(np.float32)

    def settings(nprobe: int | None) -> Settings:
        return Settings(
            state_dir=tmp_path, index=IndexSettings(path=tmp_path / "index", factory="IVF16,Flat", nprobe=nprobe)
        )

    every_list = _recall(settings(16), vectors, queries)
    one_list = _recall(settings(1), vectors, queries)
    assert every_list == pytest.approx(1.0)  # all 16 lists visited: exact
    assert one_list < 0.9, one_list  # one list: the setting really narrowed the search
    assert stores.embedding_index(settings(16), DIM).config.nprobe == 16  # the workers' index too
