"""Drift per generator: how the songs each generator published lately compare with the model's training.

A new generative system, or a new version of one, can move its songs away from what the model was
trained on; its scores then look as confident as ever. For each generator, over a window of recent
songs, this measures (docs/model.md, "Drift per generator"):

- ``songs``: how many it published;
- ``seen``: whether the model's training songs included it (the card's ``training.generators``);
- ``ood_percentile``, ``ood_share``: the mean OOD percentile of its songs and the share flagged;
- ``mean_shift``: the OOD distance of its songs' *mean* head input from the training distribution,
  divided by the median distance of a held-out training song. A generator like the training songs
  has a mean near the training mean (the noise averages out): well under 1. A generator whose songs
  moved together, even a little each, shows here before any one of them looks out of place;
- ``score_shift``: per task, the largest gap between the share of its songs below each of the
  training scores' quantiles and that quantile (a Kolmogorov-Smirnov distance read at the training
  quantiles the card keeps): 0 for the training distribution, up to 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ranker.model.ood import OodModel

#: The training scores' quantiles the model card keeps (``training.score_quantiles``).
QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def score_quantiles(scores: npt.ArrayLike, tasks: Sequence[str]) -> dict[str, list[float]]:
    """Each task's :data:`QUANTILES` of these songs' scores (B, T): what the card keeps of training."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        return {}
    return {t: [float(q) for q in np.quantile(s[:, j], QUANTILES)] for j, t in enumerate(tasks)}


@dataclass
class GeneratorDrift:
    """One generator's window (see the module docstring); None where the model or the songs lack the data."""

    generator: str
    songs: int
    seen: bool | None
    ood_percentile: float | None = None
    ood_share: float | None = None
    mean_shift: float | None = None
    score_shift: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generator_drift(
    generators: Sequence[str],
    scores: Mapping[str, npt.ArrayLike],
    *,
    training: Mapping[str, Any] | None = None,
    ood_percentile: npt.ArrayLike | None = None,
    ood_flag: npt.ArrayLike | None = None,
    inputs: npt.ArrayLike | None = None,
    ood: OodModel | None = None,
) -> list[GeneratorDrift]:
    """The drift of each generator among these songs (most songs first).

    ``scores``: task -> each song's score (NaN where absent); ``training``: the model card's training
    record (its ``generators`` and ``score_quantiles``); ``ood_percentile``/``ood_flag``: each song's,
    NaN/False where it has none; ``inputs`` (B, ...): the songs' head inputs, with the model's ``ood``,
    for the mean shift (rows of NaN: no embedding)."""
    gens = np.asarray(list(generators), dtype=object)
    seen_list = (training or {}).get("generators")
    seen = set(seen_list) if isinstance(seen_list, list) else None
    quantiles = (training or {}).get("score_quantiles") or {}
    pct = None if ood_percentile is None else np.asarray(ood_percentile, dtype=np.float64)
    flags = None if ood_flag is None else np.asarray(ood_flag, dtype=np.bool_)
    x = None if inputs is None or ood is None else np.asarray(inputs, dtype=np.float64)
    typical = float(np.median(ood.calibration)) if ood is not None else 0.0
    out: list[GeneratorDrift] = []
    counted: dict[str, int] = {}
    for g in gens.tolist():
        counted[str(g)] = counted.get(str(g), 0) + 1
    for name, count in sorted(counted.items(), key=lambda nc: (-nc[1], nc[0])):
        rows = gens == name
        d = GeneratorDrift(name, count, None if seen is None else name in seen)
        if pct is not None:
            mine = pct[rows][~np.isnan(pct[rows])]
            if len(mine):
                d.ood_percentile = float(mine.mean())
                d.ood_share = float(flags[rows][~np.isnan(pct[rows])].mean()) if flags is not None else None
        if x is not None and ood is not None and typical > 0:
            mine_x = x[rows].reshape(int(rows.sum()), -1)
            mine_x = mine_x[~np.isnan(mine_x).any(axis=1)]
            if len(mine_x):
                d.mean_shift = float(ood.distance(mine_x.mean(axis=0, keepdims=True))[0]) / typical
        for task, values in scores.items():
            q = quantiles.get(task)
            v = np.asarray(values, dtype=np.float64)[rows]
            v = v[~np.isnan(v)]
            if q and len(v) and len(q) == len(QUANTILES):
                below = np.searchsorted(np.sort(v), np.asarray(q, dtype=np.float64), side="right") / len(v)
                d.score_shift[task] = float(np.abs(below - np.asarray(QUANTILES)).max())
        out.append(d)
    return out
