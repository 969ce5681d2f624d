"""Turning evaluated columns into a response: the rerank order, explanations, the first non-finite value.

Shared by feed pages and reranks (:mod:`ranker.serving.reader`): the items are built from
numpy columns, one dict per item returned, in the order and with the keys and floats that
``Policy.explain`` gives per song.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ranker.serving.batch import BatchEvaluation, SongBatch
from ranker.serving.policy import uncertainty


@dataclass
class RankResponse:
    """What ``POST /v1/rank`` answers, and the path in ``body["items"]`` of its first NaN or
    infinity (``"3.components.posterior_rate"``, in serialisation order), None if all are finite."""

    body: dict[str, Any]
    non_finite: str | None


def rank_order(scores: np.ndarray, song_ids: list[str]) -> np.ndarray:
    """Indices sorting by ``(-score, song_id)`` exactly as ``list.sort`` with that key does.

    Without NaN the key order is total and a stable lexicographic sort gives the same order
    (ties keep their input order in both); with a NaN, whose comparisons are all false, the
    result depends on the sort's algorithm, so it is Python's own sort on the same keys.
    """
    if len(song_ids) < 2:
        return np.arange(len(song_ids))
    negated = -scores
    if not np.isnan(negated).any():
        return np.lexsort((np.asarray(song_ids), negated))
    keys = negated.tolist()
    return np.asarray(sorted(range(len(keys)), key=lambda i: (keys[i], song_ids[i])), dtype=np.intp)


def explanation_columns(
    ev: BatchEvaluation, batch: SongBatch, rows: np.ndarray, now: float
) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray, np.ndarray | None]]]:
    """The explanation's columns for these rows of an evaluated batch, in that order."""
    contributions = [(name, v[rows], None if p is None else p[rows]) for name, v, p in ev.contributions]
    parts = {
        "quality": ev.quality[rows],
        "freshness": ev.freshness[rows],
        "age_hours": (now - batch.created_ts[rows]) / 3600.0,
        "prior_rate": ev.prior_rate[rows],
        "posterior_rate": ev.posterior_rate[rows],
        "plays": batch.plays[rows],
        "likes": batch.likes[rows],
    }
    if ev.examined_plays is not None:
        parts["examined_plays"] = ev.examined_plays[rows]
    sd, ood = batch.prior_sd, batch.ood
    if sd is not None and ood is not None:
        sd, ood = sd[rows], ood[rows]
        if ood.any() or not np.isnan(sd).all():
            parts["prior_sd"], parts["ood"] = sd, ood
            w = ev.prior_strength
            parts["prior_strength"] = w[rows] if isinstance(w, np.ndarray) else np.full(len(rows), w)
    return parts, contributions


def explanations(
    parts: dict[str, np.ndarray], contributions: list[tuple[str, np.ndarray, np.ndarray | None]]
) -> list[dict[str, Any]]:
    """``Policy.explain`` of each song, from the arrays (same keys, same order, same floats); with
    ``examined_plays`` after ``plays`` when ``parts`` has it (a position-aware policy), and the
    uncertainty terms last for a song whose model gave a spread or an OOD flag."""
    out = _explanations(parts, contributions)
    sd = parts.get("prior_sd")
    if sd is not None:
        ood, w = parts["ood"], parts["prior_strength"]
        for k in np.flatnonzero(~np.isnan(sd) | ood).tolist():
            spread = float(sd[k])
            out[k].update(uncertainty(None if math.isnan(spread) else spread, bool(ood[k]), float(w[k])))
    return out


def _explanations(
    parts: dict[str, np.ndarray], contributions: list[tuple[str, np.ndarray, np.ndarray | None]]
) -> list[dict[str, Any]]:
    """The explanations without the uncertainty terms."""
    n = len(parts["quality"])
    names = [name for name, _, _ in contributions]
    values = np.column_stack([v for _, v, _ in contributions]).tolist() if n else []
    if all(p is None for _, _, p in contributions):
        terms = [dict(zip(names, row, strict=True)) for row in values]
    else:
        masks = np.column_stack([np.ones(n, np.bool_) if p is None else p for _, _, p in contributions]).tolist()
        terms = [
            {name: v for name, v, m in zip(names, row, mask, strict=True) if m}
            for row, mask in zip(values, masks, strict=True)
        ]
    columns = (
        parts["quality"].tolist(),
        parts["freshness"].tolist(),
        parts["age_hours"].tolist(),
        terms,
        parts["prior_rate"].tolist(),
        parts["posterior_rate"].tolist(),
        parts["plays"].tolist(),
        parts["likes"].tolist(),
    )
    examined = parts.get("examined_plays")
    if examined is not None:
        return [
            {
                "quality": q,
                "freshness": f,
                "age_hours": a,
                "contributions": c,
                "prior_rate": p0,
                "posterior_rate": m,
                "plays": pl,
                "examined_plays": e,
                "likes": lk,
            }
            for q, f, a, c, p0, m, pl, lk, e in zip(*columns, examined.tolist(), strict=True)
        ]
    return [
        {
            "quality": q,
            "freshness": f,
            "age_hours": a,
            "contributions": c,
            "prior_rate": p0,
            "posterior_rate": m,
            "plays": pl,
            "likes": lk,
        }
        for q, f, a, c, p0, m, pl, lk in zip(*columns, strict=True)
    ]


def first_non_finite(columns: list[tuple[str, np.ndarray, np.ndarray | None]]) -> str | None:
    """The path of the first NaN or infinity, item by item, each item's values in serialisation order."""
    bad = np.column_stack(
        [~np.isfinite(v) if present is None else ~np.isfinite(v) & present for _, v, present in columns]
    )
    rows = np.flatnonzero(bad.any(axis=1))
    if not len(rows):
        return None
    i = int(rows[0])
    return f"{i}.{columns[int(np.argmax(bad[i]))][0]}"


def mark_untrained(items: list[dict[str, Any]], untrained: np.ndarray | None) -> None:
    """``"untrained": true`` on the items (row ``i`` is ``items[i]``) whose scores an untrained,
    seeded head made; the key is absent otherwise, so trained output carries no extra bytes."""
    if untrained is None or not untrained.any():
        return
    for i in np.flatnonzero(untrained).tolist():
        items[i]["untrained"] = True
