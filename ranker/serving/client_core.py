"""What the two API clients (:mod:`ranker.serving.client`) share, with no I/O: the endpoints as
:class:`Call` objects (method, path, query, body and how to parse a 2xx body into the models), the
errors, and :meth:`_ClientCore._settle`, which decides what an attempt's answer (or error) means: a
result, an error to raise, or a :class:`Backoff`."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from ranker.retry_after import retry_after_s
from ranker.serving.client_events import EVENTS_PATH, EventRounds, EventsResult
from ranker.serving.client_models import FeedPage, Filters, RankedSong, RankResult, SimilarSong

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
