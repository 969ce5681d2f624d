"""Which FAISS index, for how many vectors: the index's config and ``factory="auto"``'s pick.

Pure configuration (no FAISS import): :mod:`indexes.faiss_index` builds what this describes.
docs/indexes.md has the table by collection size and the measurements behind it.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

#: The factory that picks by size; see :func:`auto_factory`.
AUTO = "auto"
#: Exact search up to here: a query scans every vector (p50 116 ms at 1M, one core).
FLAT_UP_TO = 100_000
#: IVF lists of float32 vectors up to here; SQ8 codes beyond (at 1M: 805 B against 3,109 B a
#: vector, recall@10 0.975 against 0.991, and faster).
IVF_FLAT_UP_TO = 1_000_000


def auto_factory(expected_size: int) -> tuple[str, int | None]:
    """The (factory, nprobe) ``factory="auto"`` picks for ``expected_size`` vectors (docs/indexes.md).

    Flat while a query's full scan is cheap; then IVF with a power of two near 4·sqrt(N)
    lists (FAISS's rule of thumb), probed for recall@10 >= 0.95 on clustered 768-d vectors;
    SQ8 codes past ``IVF_FLAT_UP_TO``. Never HNSW (it cannot ``remove_ids``, which takedown and
    retention need) nor PQ (recall@10 0.28 at 1M on the same vectors).
    """
    if expected_size <= FLAT_UP_TO:
        return "Flat", None
    nlist = 2 ** round(math.log2(4 * math.sqrt(expected_size)))
    codes = "Flat" if expected_size <= IVF_FLAT_UP_TO else "SQ8"
    return f"IVF{nlist},{codes}", max(8, nlist // 64)


class FaissIndexConfig(BaseModel):
    """One FAISS index: its dimension, factory string, search knobs and GPU policy."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(gt=0)
    factory: str = Field(
        "Flat", min_length=1, description="faiss.index_factory string, without IDMap; or 'auto' (by expected_size)."
    )
    metric: Literal["inner_product"] = Field(
        "inner_product", description="Vectors are L2-normalised, so inner product is cosine similarity."
    )
    use_gpu: Literal["auto", "never", "always"] = "auto"
    nprobe: int | None = Field(None, ge=1, description="IVF lists visited per query (FAISS default 1).")
    ef_search: int | None = Field(None, ge=1, description="HNSW search breadth (FAISS default 16).")
    train_size: int | None = Field(
        None, ge=1, description="Vectors buffered before training an untrained factory; default from nlist."
    )
    expected_size: int | None = Field(
        None, ge=0, description="For factory 'auto': the collection size to pick the index type for."
    )

    def resolved(self) -> FaissIndexConfig:
        """This config with ``auto`` replaced by :func:`auto_factory`'s pick (and its nprobe, unless set)."""
        if self.factory != AUTO:
            return self
        factory, nprobe = auto_factory(self.expected_size or 0)
        log.info("index factory 'auto' for %d vectors: %s (nprobe %s)", self.expected_size or 0, factory, nprobe)
        return self.model_copy(update={"factory": factory, "nprobe": self.nprobe or nprobe})
