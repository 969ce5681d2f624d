"""A small typed client for recommender backends: ``ApexRankClient(base_url, token=...)``.

Every call has a timeout. Connection errors, timeouts and 500/502/503/504 answers
are retried with exponential backoff and jitter (all endpoints are reads, so a retry is
always safe); any other error status raises :class:`ApexRankError` at once, with
the server's error code and message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

RETRY_STATUSES = frozenset({500, 502, 503, 504})


class ApexRankError(Exception):
    """The API answered with an error (``status``, ``code``, ``message``), or never answered."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


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


@dataclass(frozen=True)
class RankResult:
    feed: str
    items: list[RankedSong]
    unknown: list[str]
    filtered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SimilarSong:
    song_id: str
    similarity: float


def _songs(items: Sequence[Mapping[str, Any]]) -> list[RankedSong]:
    return [
        RankedSong(i["song_id"], float(i["score"]), dict(i.get("components", {})), bool(i.get("explore", False)))
        for i in items
    ]


class ApexRankClient:
    """Synchronous client (thread-safe: httpx pools connections)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries must be >= 0, timeout_s > 0 and backoff_s >= 0")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s, transport=transport)

    # -- transport ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt >= self.retries:
                    raise ApexRankError(0, "unreachable", f"{method} {path}: {exc!r}") from exc
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    raise _error(response)
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            time.sleep(delay * (0.5 + random.random() / 2))
            attempt += 1

    # -- endpoints ------------------------------------------------------------------------------
    def feed(self, feed: str, *, limit: int = 50, cursor: str | None = None) -> FeedPage:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        data = self._request("GET", f"/v1/feeds/{feed}", params=params)
        return FeedPage(data["feed"], _songs(data["items"]), data.get("next_cursor"))

    def iter_feed(self, feed: str, *, limit: int = 50, max_pages: int | None = None) -> Iterator[RankedSong]:
        """Every song of a feed, page after page (stops after ``max_pages`` pages when given)."""
        cursor: str | None = None
        pages = 0
        while max_pages is None or pages < max_pages:
            page = self.feed(feed, limit=limit, cursor=cursor)
            pages += 1
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def rank(
        self,
        candidates: Sequence[str],
        *,
        feed: str | None = None,
        weights: Mapping[str, float] | None = None,
        apply_filters: bool = False,
    ) -> RankResult:
        body: dict[str, Any] = {"candidates": list(candidates), "apply_filters": apply_filters}
        if feed is not None:
            body["feed"] = feed
        if weights is not None:
            body["weights"] = dict(weights)
        data = self._request("POST", "/v1/rank", json=body)
        return RankResult(data["feed"], _songs(data["items"]), list(data["unknown"]), list(data["filtered"]))

    def song(self, song_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/songs/{song_id}")
        return result

    def similar(self, song_id: str, k: int = 10) -> list[SimilarSong]:
        data = self._request("GET", f"/v1/songs/{song_id}/similar", params={"k": k})
        return [SimilarSong(i["song_id"], float(i["similarity"])) for i in data["items"]]

    def ready(self) -> bool:
        """Whether /readyz says Redis and the index are up (never raises for a 503)."""
        try:
            self._request("GET", "/readyz")
        except ApexRankError:
            return False
        return True

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApexRankClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _error(response: httpx.Response) -> ApexRankError:
    try:
        body = response.json()
        return ApexRankError(response.status_code, str(body.get("error", "error")), str(body.get("message", "")))
    except (ValueError, AttributeError):
        return ApexRankError(response.status_code, "error", response.text[:500])
