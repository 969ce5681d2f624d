"""The API's request and response models: OpenAPI documents them; the hot paths serialise plain dicts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ranker.events import SongId
from ranker.serving.filters import FiltersIn


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Components(_Out):
    quality: float = Field(description="Weighted blend of popularity and aesthetics, 0-1.")
    freshness: float = Field(description="2^(-age/half-life).")
    age_hours: float
    contributions: dict[str, float] = Field(description="Each term's share of the quality.")
    prior_rate: float = Field(description="p0: the model's like rate, calibrated.")
    posterior_rate: float = Field(description="(w*p0 + likes) / (w + plays).")
    plays: float
    likes: float
    sampled_rate: float | None = Field(None, description="Exploration slots: the Thompson draw.")
    taste: dict[str, float] | None = Field(
        None, description="Personal pages (?user=): the taste term's cosine, weight w and contribution."
    )


class Item(_Out):
    song_id: str
    score: float = Field(description="(0.01 + quality) * freshness.")
    explore: bool = False
    untrained: bool = Field(False, description="Scored by an untrained, seeded head (present only when true).")
    components: Components | None = Field(None, description="Absent from /v1/rank with explain=false.")


class FeedPageOut(_Out):
    feed: str
    items: list[Item]
    next_cursor: str | None = Field(description="Pass back as ?cursor= for the next page; null at the end.")
    request_id: str = Field(description="This response's id: send it as engagement events' request_id.")


class RankIn(BaseModel):
    """Candidates to order, and the policy: a named feed, optionally with inline overrides."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[SongId] = Field(min_length=1)
    feed: str | None = Field(None, description="Base policy; default: the default feed.")
    weights: dict[str, float] | None = Field(None, description="Inline weights over the seven tasks.")
    half_life_hours: float | None = Field(None, description="Inline half-life (explicit null: no decay).")
    prior_strength: float | None = Field(None, description="Inline w.")
    apply_filters: bool = Field(False, description="List candidates the feed's filters reject in 'filtered'.")
    explain: bool = Field(True, description="Include each score's components (about a third of the cost).")
    filters: FiltersIn | None = Field(None, description="Request-time filters; what they reject is in 'filtered'.")
    user: str | None = Field(None, description="A listener: taste blended in, heard songs in 'filtered'.")


class RankOut(_Out):
    feed: str
    items: list[Item]
    unknown: list[str] = Field(description="Ids with no scored song: never silently dropped.")
    filtered: list[str]
    request_id: str = Field(description="This response's id: send it as engagement events' request_id.")


class SimilarOut(_Out):
    song_id: str
    items: list[dict[str, Any]]


class ErrorOut(BaseModel):
    error: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 413, 422, 503)}
