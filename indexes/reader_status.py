"""What the API's index readers (one shard, or several fanned out) share: their status and their errors.

Apart from :mod:`indexes.index_reader` so that the fan-out reader (:mod:`indexes.sharded_reader`), which
that module re-exports, imports no module that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReaderStatus:
    ready: bool
    vectors: int
    watermark: int
    source: str  # "snapshot", "store" or "none"
    reason: str | None


class NotLoaded(LookupError):
    """A read of a reader holding no index (none loaded yet, or its store was deleted): the API answers 503."""


def frozen(array: np.ndarray | None) -> np.ndarray | None:
    """``array``, read-only: one copy is handed to every caller."""
    if array is not None:
        array.flags.writeable = False
    return array
