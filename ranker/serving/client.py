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

Everything but I/O is shared: the endpoint functions below build a :class:`Call` (method, path,
query, body and how to parse a 2xx body into the models), and :meth:`_ClientCore._settle` decides
what an attempt's answer (or error) means: a result, an error to raise, or a :class:`Backoff`.
Each client is a thin transport that sends calls with its own httpx client and sleeps its way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from ranker.retry_after import retry_after_s
from ranker.serving.client_events import EVENTS_PATH, EventRounds, EventsResult
from ranker.serving.client_events import EventResult as EventResult  # re-exported: send_events answers with it
from ranker.serving.client_models import FeedPage as FeedPage  # re-exported, with the other models
from ranker.serving.client_models import Filters as Filters
from ranker.serving.client_models import RankedSong as RankedSong
from ranker.serving.client_models import RankResult as RankResult
from ranker.serving.client_models import SimilarSong as SimilarSong

if TYPE_CHECKING:  # the client does not load pydantic: an Engagement is sent by its model_dump
    from ranker.events import Engagement


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses whose Retry-After is honoured (the API's events and table_loading 503s ask 5 s and 1 s).
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: Seconds ``send_events`` waits for an answer: above the server's default kafka.request_timeout_ms
#: (30 s), after which it answers a Kafka outage with per-event results (rejected apart from failed).
EVENTS_TIMEOUT_S = 40.0
#: Failures without an answer (refused, reset, timed out...); retried like a 5xx.
TRANSIENT_ERRORS = (httpx.TransportError, httpx.TimeoutException)

T = TypeVar("T")


class ApexRankError(Exception):
    """The API answered with an error (``status``, ``code``, ``message``), or never answered."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


# -- the shared core: requests and their parsing, the retry decision (no I/O) ---------------------
@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to send: where, with what, and how to read the JSON of a 2xx answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None


@dataclass(frozen=True)
class Backoff:
    """The attempt failed in a way worth retrying: wait ``delay_s``, then send the call again."""

    delay_s: float


def _songs(items: Sequence[Mapping[str, Any]]) -> list[RankedSong]:
    return [
        RankedSong(i["song_id"], float(i["score"]), dict(i.get("components", {})), bool(i.get("explore", False)))
        for i in items
    ]


def _as_is(data: Any) -> Any:
    return data


def _feed_call(
    feed: str, limit: int, cursor: str | None, filters: Filters | None = None, user: str | None = None
) -> Call[FeedPage]:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    if user is not None:  # a personal feed; its cursors are bound to the user
        params["user"] = user
    if filters is not None:
        params.update(filters.query())
    return Call(
        "GET",
        f"/v1/feeds/{feed}",
        lambda data: FeedPage(data["feed"], _songs(data["items"]), data.get("next_cursor"), data.get("request_id")),
        params=params,
    )


def _rank_call(
    candidates: Sequence[str],
    feed: str | None,
    weights: Mapping[str, float] | None,
    apply_filters: bool,
    filters: Filters | None = None,
    user: str | None = None,
) -> Call[RankResult]:
    body: dict[str, Any] = {"candidates": list(candidates), "apply_filters": apply_filters}
    if user is not None:
        body["user"] = user
    if filters is not None:
        body["filters"] = filters.body()
    if feed is not None:
        body["feed"] = feed
    if weights is not None:
        body["weights"] = dict(weights)
    return Call(
        "POST",
        "/v1/rank",
        lambda data: RankResult(
            data["feed"], _songs(data["items"]), list(data["unknown"]), list(data["filtered"]), data.get("request_id")
        ),
        json=body,
    )


def _segment(song_id: str) -> str:
    """``song_id`` as one path segment: percent-escaped, and "." and ".." as %2E and %2E%2E, which
    URL normalisation would otherwise collapse ("/v1/songs/.." is "/v1")."""
    escaped = quote(song_id, safe="")
    return escaped.replace(".", "%2E") if escaped in (".", "..") else escaped


def _song_call(song_id: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/songs/{_segment(song_id)}", _as_is)


def _similar_call(song_id: str, k: int) -> Call[list[SimilarSong]]:
    return Call(
        "GET",
        f"/v1/songs/{_segment(song_id)}/similar",
        lambda data: [SimilarSong(i["song_id"], float(i["similarity"])) for i in data["items"]],
        params={"k": k},
    )


_READY: Call[Any] = Call("GET", "/readyz", _as_is)


class EventsNotPublished(ApexRankError):
    """``send_events`` gave up with events not in: ``result`` says, event by event, which are
    (accepted), which never will be (rejected, duplicate) and which to send again (failed)."""

    def __init__(self, status: int, code: str, message: str, result: EventsResult) -> None:
        super().__init__(status, code, message)
        self.result = result


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error(response: httpx.Response) -> ApexRankError:
    try:
        body = response.json()
        return ApexRankError(response.status_code, str(body.get("error", "error")), str(body.get("message", "")))
    except (ValueError, AttributeError):
        return ApexRankError(response.status_code, "error", response.text[:500])


class _ClientCore:
    """Configuration and the retry policy shared by both clients."""

    def __init__(
        self,
        *,
        token: str | None,
        timeout_s: float,
        events_timeout_s: float,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        max_retry_after_s: float,
    ):
        if retries < 0 or timeout_s <= 0 or events_timeout_s <= 0 or backoff_s < 0 or max_retry_after_s < 0:
            raise ValueError(
                "retries must be >= 0, timeout_s and events_timeout_s > 0, backoff_s and max_retry_after_s >= 0"
            )
        self.retries = retries
        self.events_timeout_s = events_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _backoff(self, attempt: int) -> float:
        """``backoff_s · 2^attempt``, capped at ``max_backoff_s``, jittered to 50-100%."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return delay * (0.5 + random.random() / 2)

    def _retry(self, attempt: int, outcome: httpx.Response | Exception) -> Backoff:
        """The wait before the next attempt: the backoff, or at least what a 429/503's Retry-After
        asks, up to ``max_retry_after_s`` (sooner would meet the same outage)."""
        delay = self._backoff(attempt)
        if isinstance(outcome, httpx.Response) and outcome.status_code in RETRY_AFTER_STATUSES:
            asked = retry_after_s(outcome.headers.get("retry-after"))
            if asked is not None:
                delay = max(delay, min(asked, self.max_retry_after_s))
        return Backoff(delay)

    def _settle(self, call: Call[T], attempt: int, outcome: httpx.Response | Exception) -> T | Backoff:
        """What attempt ``attempt`` (0 first) of ``call`` came to: its result, a :class:`Backoff`
        before the next attempt, or (raised) the :class:`ApexRankError` to give up with."""
        if isinstance(outcome, Exception):
            if attempt >= self.retries:
                raise ApexRankError(0, "unreachable", f"{call.method} {call.path}: {outcome!r}") from outcome
        elif outcome.status_code < 400:
            return call.parse(outcome.json())
        elif outcome.status_code not in RETRY_STATUSES or attempt >= self.retries:
            raise _error(outcome)
        return self._retry(attempt, outcome)

    def _settle_events(
        self, rounds: EventRounds, attempt: int, outcome: httpx.Response | Exception
    ) -> EventsResult | Backoff:
        """As :meth:`_settle`, for a round of ``send_events``: an answer with per-event results is
        merged, and only its failed events go again; after no answer (or a 5xx without results) the
        same events go again, safe since the server counts an event_id once. Events never answered
        for end ``failed`` with code ``unreachable``: the server never said, so some may be invalid."""
        if isinstance(outcome, Exception):
            status, code, message = 0, "unreachable", f"POST {EVENTS_PATH}: {outcome!r}"
        else:
            status = outcome.status_code
            body = _json_or_none(outcome)
            if isinstance(body, dict) and isinstance(body.get("results"), list):
                rounds.merge(body)
                if not rounds.pending:
                    return rounds.outcome()
            error = _error(outcome)
            code, message = error.code, error.message
            if status not in RETRY_STATUSES:  # the request itself was refused: sending it again cannot help
                raise EventsNotPublished(status, code, message, rounds.outcome(code, message))
        if attempt >= self.retries:
            raise EventsNotPublished(status, code, message, rounds.outcome(code, message))
        return self._retry(attempt, outcome)


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
