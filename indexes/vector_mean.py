"""The catalog's mean vector direction, from (sum, count) pairs that index readers keep as vectors come and go."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexes.faiss_index import FaissVectorIndex


def mean_direction(sums: Sequence[tuple[np.ndarray | None, int]]) -> np.ndarray | None:
    """The unit mean of the vectors behind these (sum, count) pairs; None without any (or a zero mean).

    Song embeddings share a large common direction (logmel's cosines average about 0.55 between
    unrelated songs); a listener's taste compared with songs along it says little about the listener.
    Personal feeds take it out of both sides (ranker.serving.personal).
    """
    parts = [(total, n) for total, n in sums if total is not None and n > 0]
    if not parts or len({len(t) for t, _ in parts}) > 1:
        return None
    total = np.sum([t for t, _ in parts], axis=0)
    norm = float(np.linalg.norm(total))
    return (total / norm).astype(np.float32) if norm > 1e-9 else None


def vector_sum(index: FaissVectorIndex | None, chunk: int = 65_536) -> np.ndarray | None:
    """The sum of an index's vectors, read back in chunks (a load: a snapshot holds no sum)."""
    if index is None or not index.ntotal:
        return None
    keys = index.keys()
    total: np.ndarray | None = None
    for start in range(0, len(keys), chunk):
        found = index.reconstruct_many(np.asarray(keys[start : start + chunk], dtype=np.int64))
        if found:
            part = np.sum(np.stack(list(found.values())).astype(np.float64), axis=0)
            total = part if total is None else total + part
    return total
