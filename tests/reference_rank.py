"""The per-song rerank that ``FeedReader.rank`` was before its vectorised pass: the reference it is held to.

Moved here unchanged (``self`` is now the ``reader`` argument): one SongState per candidate
(``state_from_fields``), ``Policy.evaluate`` per song, ``Policy.explain`` per item. The
product path does not call it; tests/test_rank_equivalence.py and benchmarks/api_latency.py do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ranker.serving.policy import Evaluation, Policy, SongState
from ranker.serving.reader import FeedReader
from ranker.serving.state import READ_FIELDS, WRITE_FIELDS, state_from_fields


async def reference_rank(
    reader: FeedReader,
    candidates: Sequence[str],
    policy: Policy,
    *,
    apply_filters: bool = False,
    explain: bool = True,
) -> dict[str, Any]:
    """Order known candidates by the policy's score; unknown (unscored) and filtered ids listed apart."""
    now = reader._clock()
    scale = await reader.scale()
    fields = WRITE_FIELDS if apply_filters else READ_FIELDS
    values = await reader.reads.read_fields(candidates, fields)
    scored: list[tuple[SongState, Evaluation]] = []
    unknown: list[str] = []
    filtered: list[str] = []
    for song_id, v in zip(candidates, values, strict=True):
        state = state_from_fields(song_id, v, now)
        if state is None:
            unknown.append(song_id)
        elif apply_filters and not (policy.admits(state) and policy.in_age_window(state.created_ts, now)):
            filtered.append(song_id)
        else:
            scored.append((state, policy.evaluate(state, scale, now)))
    scored.sort(key=lambda se: (-se[1].score, se[0].song_id))
    return {
        "feed": policy.name,
        "items": [
            {"song_id": s.song_id, "score": ev.score, "components": policy.explain(s, ev, now)}
            if explain
            else {"song_id": s.song_id, "score": ev.score}
            for s, ev in scored
        ],
        "unknown": unknown,
        "filtered": filtered,
    }
