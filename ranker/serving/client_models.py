"""What the API clients (:mod:`ranker.serving.client`) answer with, and the filters they send.

Plain frozen dataclasses, apart from the clients' transport, so a backend can type against them
without loading httpx.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FeedPage", "Filters", "RankResult", "RankedSong", "SimilarSong"]


@dataclass(frozen=True)
class RankedSong:
    song_id: str
    score: float
    components: dict[str, Any]
    explore: bool = False


@dataclass(frozen=True)
class FeedPage:
    feed: str
    items: list[RankedSong]
    next_cursor: str | None
    request_id: str | None = None  # send it as engagement events' request_id


@dataclass(frozen=True)
class RankResult:
    feed: str
    items: list[RankedSong]
    unknown: list[str]
    filtered: list[str] = field(default_factory=list)
    request_id: str | None = None  # send it as engagement events' request_id


@dataclass(frozen=True)
class SimilarSong:
    song_id: str
    similarity: float


@dataclass(frozen=True)
class Filters:
    """Request-time filters of a feed page or a rerank (docs/ranking.md, "Request-time filters").

    A feed walk's cursor is bound to its filters: pass the same ``Filters`` with every page.
    """

    generators: Sequence[str] = ()
    tags: Sequence[str] = ()
    tag_mode: str = "any"
    max_age_hours: float | None = None
    exclude: Sequence[str] = ()

    def query(self) -> dict[str, Any]:
        """As feed page query parameters (lists repeat the parameter; exclude is one comma list)."""
        out: dict[str, Any] = {}
        if self.generators:
            out["generator"] = list(self.generators)
        if self.tags:
            out["tag"] = list(self.tags)
            out["tag_mode"] = self.tag_mode
        if self.max_age_hours is not None:
            out["max_age_hours"] = self.max_age_hours
        if self.exclude:
            out["exclude"] = ",".join(self.exclude)
        return out

    def body(self) -> dict[str, Any]:
        """As ``POST /v1/rank``'s ``filters`` object."""
        return {
            "generators": list(self.generators),
            "tags": list(self.tags),
            "tag_mode": self.tag_mode,
            "max_age_hours": self.max_age_hours,
            "exclude": list(self.exclude),
        }
