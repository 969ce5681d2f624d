"""``POST /v1/rank``: candidates ordered by a feed's policy over one columnar batch of the song table.

The candidates' rows of the song table as one batch (:mod:`ranker.serving.batch`), the policy
evaluated over it in numpy; item dicts are built only for the songs returned, explanations only
when asked. Order: score descending, then song id. A listener's heard songs are filtered and every
candidate's score carries the taste term (docs/ranking.md, "Personal feeds").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ranker.serving.batch import admits, evaluate, in_age_window
from ranker.serving.columns import (
    RankResponse,
    explanation_columns,
    explanations,
    first_non_finite,
    mark_untrained,
    rank_order,
)
from ranker.serving.filters import RequestFilters
from ranker.serving.personal import Personal
from ranker.serving.policy import Policy

if TYPE_CHECKING:
    from ranker.serving.reader import VectorSource
    from ranker.serving.table import SongTable


def rerank(
    table: SongTable,
    policy: Policy,
    candidates: Sequence[str],
    *,
    scale: float,
    now: float,
    person: Personal | None,
    vectors: VectorSource | None,
    apply_filters: bool,
    explain: bool,
    filters: RequestFilters,
) -> RankResponse:
    """The rank answer, and where its first non-finite number is, found on the arrays.

    ``apply_filters``: the feed's configured filters; ``filters``: the request's, always applied.
    Candidates either rejects are listed in ``filtered``.
    """
    if person is not None:
        filters = filters.excluding(person.heard)
    rows = table.rows(candidates)
    known = rows >= 0
    unknown = [c for c, k in zip(candidates, known.tolist(), strict=True) if not k]
    batch = table.batch(rows[known], now, filters=apply_filters)
    keep = np.ones(len(batch), np.bool_)
    if apply_filters:
        keep = admits(policy, batch) & in_age_window(policy, batch.created_ts, now, filters.max_age_s)
    elif filters.max_age_s is not None:
        keep = (now - batch.created_ts) < filters.max_age_s
    if not filters.empty:
        keep &= filters.mask(table, rows[known])
    filtered = [batch.song_ids[i] for i in np.flatnonzero(~keep).tolist()]
    kept = np.flatnonzero(keep)
    ev = evaluate(policy, batch, scale, now)
    score, cosine = ev.score, None
    if person is not None and person.blends and len(kept):
        keys = table.key[rows[known][kept]].tolist()
        got, matrix = vectors.vector_matrix(keys) if vectors else (np.zeros(len(keys), np.bool_), None)
        cosine = np.zeros(len(batch))
        cosine[kept] = person.cosines(got, matrix) if matrix is not None else 0.0
        score = score * np.exp(person.scale * cosine)
    order = kept[rank_order(score[kept], [batch.song_ids[i] for i in kept.tolist()])]
    ids = [batch.song_ids[i] for i in order.tolist()]
    scores = score[order]
    columns: list[tuple[str, np.ndarray, np.ndarray | None]] = [("score", scores, None)]
    if explain:
        parts, contributions = explanation_columns(ev, batch, order, now)
        columns += [(f"components.{k}", parts[k], None) for k in ("quality", "freshness", "age_hours")]
        columns += [(f"components.contributions.{name}", v, p) for name, v, p in contributions]
        columns += [(f"components.{k}", parts[k], None) for k in ("prior_rate", "posterior_rate", "plays", "likes")]
        items = [
            {"song_id": sid, "score": sc, "components": comp}
            for sid, sc, comp in zip(ids, scores.tolist(), explanations(parts, contributions), strict=True)
        ]
        if person is not None and cosine is not None:
            for item, c in zip(items, cosine[order].tolist(), strict=True):
                item["components"]["taste"] = person.explain(c)
    else:
        items = [{"song_id": sid, "score": sc} for sid, sc in zip(ids, scores.tolist(), strict=True)]
    mark_untrained(items, None if batch.untrained is None else batch.untrained[order])
    body = {"feed": policy.name, "items": items, "unknown": unknown, "filtered": filtered}
    return RankResponse(body, first_non_finite(columns))
