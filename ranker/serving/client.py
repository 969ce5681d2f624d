"""Small typed clients for recommender backends: ``ApexRankClient(base_url, token=...)`` (blocking)
and ``AsyncApexRankClient`` (asyncio), with the same methods, models and retry policy.

Every call has a timeout. Connection errors, timeouts and 429/500/502/503/504 answers
are retried with exponential backoff and jitter, or after the answer's Retry-After (up to
``max_retry_after_s``): the reads are safe to repeat, and so are events, since the server
counts an ``event_id`` once. Any other error status raises :class:`ApexRankError` at once, with
the server's error code and message. ``send_events`` sends again only the events not yet in
(those a 503 reports failed, or all after no answer); it waits ``events_timeout_s`` for an
answer, longer than the server takes to give up on Kafka, since only an answer tells the
events it rejects from those to send again.

Everything but I/O is shared (:mod:`ranker.serving.client_core`: the endpoints as calls, the errors,
the retry decision). Each client here is a thin transport that sends calls with its own httpx
client and sleeps its way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from ranker.serving.client_core import (
    _READY,
    TRANSIENT_ERRORS,
    Backoff,
    Call,
    T,
    _as_is,
    _ClientCore,
    _feed_call,
    _rank_call,
    _similar_call,
    _song_call,
)
from ranker.serving.client_core import EVENTS_TIMEOUT_S as EVENTS_TIMEOUT_S
from ranker.serving.client_core import ApexRankError as ApexRankError  # re-exported: the clients raise them
from ranker.serving.client_core import EventsNotPublished as EventsNotPublished
from ranker.serving.client_events import EVENTS_PATH, EventRounds, EventsResult
from ranker.serving.client_events import EventResult as EventResult  # re-exported: send_events answers with it
from ranker.serving.client_models import FeedPage as FeedPage  # re-exported, with the other models
from ranker.serving.client_models import Filters as Filters
from ranker.serving.client_models import RankedSong as RankedSong
from ranker.serving.client_models import RankResult as RankResult
from ranker.serving.client_models import SimilarSong as SimilarSong

if TYPE_CHECKING:  # the client does not load pydantic: an Engagement is sent by its model_dump
    from ranker.events import Engagement


# -- the blocking transport ------------------------------------------------------------------------
class ApexRankClient(_ClientCore):
    """Synchronous client (thread-safe: httpx pools connections)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        events_timeout_s: float = EVENTS_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_retry_after_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            token=token,
            timeout_s=timeout_s,
            events_timeout_s=events_timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_retry_after_s=max_retry_after_s,
        )
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=timeout_s, transport=transport)

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request(call.method, call.path, params=call.params, json=call.json)
            except TRANSIENT_ERRORS as exc:
                outcome = exc
            step = self._settle(call, attempt, outcome)
            if not isinstance(step, Backoff):
                return step
            self._pause(step.delay_s)
            attempt += 1

    def _pause(self, delay_s: float) -> None:
        """The wait before a retry (its own method so a test can see the waits without taking them)."""
        time.sleep(delay_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(Call(method, path, _as_is, **kwargs))

    def feed(
        self,
        feed: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        filters: Filters | None = None,
        user: str | None = None,
    ) -> FeedPage:
        return self._send(_feed_call(feed, limit, cursor, filters, user))

    def iter_feed(
        self,
        feed: str,
        *,
        limit: int = 50,
        max_pages: int | None = None,
        filters: Filters | None = None,
        user: str | None = None,
    ) -> Iterator[RankedSong]:
        """Every song of a feed, page after page (stops after ``max_pages`` pages when given)."""
        cursor: str | None = None
        pages = 0
        while max_pages is None or pages < max_pages:
            page = self.feed(feed, limit=limit, cursor=cursor, filters=filters, user=user)
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
        filters: Filters | None = None,
        user: str | None = None,
    ) -> RankResult:
        return self._send(_rank_call(candidates, feed, weights, apply_filters, filters, user))

    def song(self, song_id: str) -> dict[str, Any]:
        return self._send(_song_call(song_id))

    def similar(self, song_id: str, k: int = 10) -> list[SimilarSong]:
        return self._send(_similar_call(song_id, k))

    def ready(self) -> bool:
        """Whether /readyz says Redis and the index are up (never raises for a 503)."""
        try:
            self._send(_READY)
        except ApexRankError:
            return False
        return True

    def send_events(self, events: Sequence[Engagement | Mapping[str, Any]]) -> EventsResult:
        """POST engagement events (``Engagement`` models or JSON-ready dicts), answered event by event;
        :class:`EventsNotPublished` if some are still not in after the retries."""
        rounds = EventRounds(events)
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request("POST", EVENTS_PATH, json=rounds.body(), timeout=self.events_timeout_s)
            except TRANSIENT_ERRORS as exc:
                outcome = exc
            step = self._settle_events(rounds, attempt, outcome)
            if not isinstance(step, Backoff):
                return step
            self._pause(step.delay_s)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApexRankClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- the asyncio transport -------------------------------------------------------------------------
class AsyncApexRankClient(_ClientCore):
    """asyncio client: the methods of :class:`ApexRankClient`, awaited (``iter_feed`` is an async
    iterator). One ``httpx.AsyncClient``, so one connection pool, serves every call; concurrent
    calls from one event loop are fine, use it from one loop only."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        events_timeout_s: float = EVENTS_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_retry_after_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            token=token,
            timeout_s=timeout_s,
            events_timeout_s=events_timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_retry_after_s=max_retry_after_s,
        )
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._headers, timeout=timeout_s, transport=transport)

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(call.method, call.path, params=call.params, json=call.json)
            except TRANSIENT_ERRORS as exc:
                outcome = exc
            step = self._settle(call, attempt, outcome)
            if not isinstance(step, Backoff):
                return step
            await self._pause(step.delay_s)
            attempt += 1

    async def _pause(self, delay_s: float) -> None:
        """The wait before a retry (its own method so a test can see the waits without taking them)."""
        await asyncio.sleep(delay_s)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._send(Call(method, path, _as_is, **kwargs))

    async def feed(
        self,
        feed: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        filters: Filters | None = None,
        user: str | None = None,
    ) -> FeedPage:
        return await self._send(_feed_call(feed, limit, cursor, filters, user))

    async def iter_feed(
        self,
        feed: str,
        *,
        limit: int = 50,
        max_pages: int | None = None,
        filters: Filters | None = None,
        user: str | None = None,
    ) -> AsyncIterator[RankedSong]:
        """Every song of a feed, page after page (stops after ``max_pages`` pages when given)."""
        cursor: str | None = None
        pages = 0
        while max_pages is None or pages < max_pages:
            page = await self.feed(feed, limit=limit, cursor=cursor, filters=filters, user=user)
            pages += 1
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def rank(
        self,
        candidates: Sequence[str],
        *,
        feed: str | None = None,
        weights: Mapping[str, float] | None = None,
        apply_filters: bool = False,
        filters: Filters | None = None,
        user: str | None = None,
    ) -> RankResult:
        return await self._send(_rank_call(candidates, feed, weights, apply_filters, filters, user))

    async def song(self, song_id: str) -> dict[str, Any]:
        return await self._send(_song_call(song_id))

    async def similar(self, song_id: str, k: int = 10) -> list[SimilarSong]:
        return await self._send(_similar_call(song_id, k))

    async def ready(self) -> bool:
        """Whether /readyz says Redis and the index are up (never raises for a 503)."""
        try:
            await self._send(_READY)
        except ApexRankError:
            return False
        return True

    async def send_events(self, events: Sequence[Engagement | Mapping[str, Any]]) -> EventsResult:
        """POST engagement events (``Engagement`` models or JSON-ready dicts), answered event by event;
        :class:`EventsNotPublished` if some are still not in after the retries."""
        rounds = EventRounds(events)
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(
                    "POST", EVENTS_PATH, json=rounds.body(), timeout=self.events_timeout_s
                )
            except TRANSIENT_ERRORS as exc:
                outcome = exc
            step = self._settle_events(rounds, attempt, outcome)
            if not isinstance(step, Backoff):
                return step
            await self._pause(step.delay_s)
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncApexRankClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
