"""``POST /v1/events``: engagement events over HTTP, onto the ``engagement`` topic the feedback consumer reads.

The body is ``{"events": [...]}``. Each event is checked by the topic's own contract
(:class:`ranker.events.Engagement`, parsed exactly as the feedback consumer parses it) and answered
for on its own, in the order sent: ``accepted`` (the broker acknowledged it: acks=all, flushed
before the answer), ``rejected`` (invalid; sending it again cannot help), ``duplicate`` (its
``event_id`` came earlier in the same batch; not produced) or ``failed`` (Kafka did not acknowledge
it: send it again). A batch with a failed event answers 503 with Retry-After, the others 202.
A resend of an event already accepted counts once: the feedback consumer deduplicates by
``event_id`` (``feedback.dedup_window_s``), so retrying a whole batch is always safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import BaseModel, Field

from ranker.errors import ErrorCode, InputError
from ranker.events import Engagement
from ranker.serving.edge import error_response
from ranker.serving.producer import ApiProducer, Delivery
from ranker.settings import FeedbackSettings, Settings

EVENTS = Counter("apexrank_api_events_total", "Events received by POST /v1/events, by outcome", ["status"])

Status = Literal["accepted", "rejected", "duplicate", "failed"]
#: Seconds a 503's Retry-After asks for: Kafka outages outlast a table load.
RETRY_AFTER_S = 5


class EventError(BaseModel):
    code: str = Field(description="invalid_json, invalid_schema, refused_by_broker or not_published.")
    message: str


class EventResult(BaseModel):
    index: int = Field(description="The event's position in the request's events list.")
    event_id: str | None = Field(description="Its event_id; null when it has none that could be read.")
    status: Status
    error: EventError | None = Field(None, description="Why, for rejected and failed events.")
    duplicate_of: int | None = Field(None, description="Duplicates: the index of the event with this id.")


class EventsOut(BaseModel):
    accepted: int
    rejected: int
    duplicate: int
    failed: int
    results: list[EventResult] = Field(description="One per event sent, in order.")
    error: str | None = Field(None, description="503 only: events_not_published.")
    message: str | None = None


class BatchError(Exception):
    """The request as a whole is refused (no event was looked at, none produced)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def read_batch(body: bytes, max_events: int) -> list[Any]:
    """The events list of a request body; :class:`BatchError` for a body that is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BatchError(422, "invalid_request", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"events"} or not isinstance(data["events"], list):
        raise BatchError(422, "invalid_request", 'the body must be a JSON object {"events": [event, ...]}')
    events: list[Any] = data["events"]
    if not events:
        raise BatchError(400, "empty_batch", "events is empty: send at least one event")
    if len(events) > max_events:
        raise BatchError(
            413,
            "too_many_events",
            f"{len(events)} events in one request; at most {max_events} (api.max_events_per_request)",
        )
    return events


def check_events(
    items: Sequence[Any], feedback: FeedbackSettings, now: datetime | None = None
) -> tuple[list[dict[str, Any]], list[tuple[int, Engagement]]]:
    """Each item's result (valid first sightings left ``accepted``, pending the broker), and those to produce.

    An item is re-encoded and parsed, and its ``ts`` checked against ``feedback``'s bounds, as the
    consumer does with a message value, so both sides accept and refuse the same events with the
    same codes.
    """
    results: list[dict[str, Any]] = []
    valid: list[tuple[int, Engagement]] = []
    first: dict[str, int] = {}
    at = now or datetime.now(UTC)
    for i, item in enumerate(items):
        try:
            # orjson reads JSON nested up to 1024 deep but writes it only up to about 254: deeper is refused
            event = Engagement.parse(_reencoded(item))
            event.check_ts(at, feedback.ts_max_skew_s, feedback.ts_min)
        except InputError as exc:
            raw_id = item.get("event_id") if isinstance(item, dict) else None
            shown = raw_id if isinstance(raw_id, str) and len(raw_id) <= 128 else None
            results.append(_result(i, shown, "rejected", str(exc.code), exc.message))
            continue
        seen = first.setdefault(event.event_id, i)
        if seen != i:
            results.append({**_result(i, event.event_id, "duplicate"), "duplicate_of": seen})
            continue
        results.append(_result(i, event.event_id, "accepted"))
        valid.append((i, event))
    return results, valid


def _reencoded(item: Any) -> bytes:
    """``item`` as the bytes a producer would send; an item too deeply nested to write is an
    ``invalid_schema`` of its own (the batch's other events go on)."""
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError as exc:
        raise InputError(ErrorCode.INVALID_SCHEMA, f"the event cannot be re-encoded ({exc})") from exc


def settle(results: list[dict[str, Any]], produced: Sequence[int], deliveries: Sequence[Delivery]) -> None:
    """Mark the produced events (``results`` indexes) that the broker did not acknowledge."""
    for i, delivery in zip(produced, deliveries, strict=True):
        if delivery.error is None:
            continue
        if delivery.permanent:  # refused for what it is: a resend would be refused again
            results[i] = _result(i, results[i]["event_id"], "rejected", "refused_by_broker", delivery.error)
        else:
            results[i] = _result(i, results[i]["event_id"], "failed", "not_published", delivery.error)


def _result(index: int, event_id: str | None, status: Status, code: str = "", message: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "event_id": event_id, "status": status}
    if code:
        out["error"] = {"code": code, "message": message}
    return out


def answer(results: list[dict[str, Any]]) -> Response:
    """202 with the per-event results, or 503 with Retry-After when any event failed."""
    counts = dict.fromkeys(("accepted", "rejected", "duplicate", "failed"), 0)
    for r in results:
        counts[r["status"]] += 1
    for status, n in counts.items():
        if n:
            EVENTS.labels(status).inc(n)
    body: dict[str, Any] = {**counts, "results": results}
    if not counts["failed"]:
        return Response(orjson.dumps(body), status_code=202, media_type="application/json")
    body["error"] = "events_not_published"
    body["message"] = (
        f"{counts['failed']} of {len(results)} events were not acknowledged by Kafka: send those marked failed "
        "again (the others are in; a resend of any of them would count once, by event_id)"
    )
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return Response(orjson.dumps(body), status_code=503, headers=headers, media_type="application/json")


def _request_body(max_events: int) -> dict[str, Any]:
    """The OpenAPI request body: the route reads its body itself, to answer for each event."""
    events = {"type": "array", "minItems": 1, "maxItems": max_events, "items": Engagement.model_json_schema()}
    envelope = {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {"events": events},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": envelope}}}}


def events_router(settings: Settings, producer: ApiProducer, dependencies: Sequence[Any]) -> APIRouter:
    """The ``POST /v1/events`` route, behind ``dependencies`` (the read endpoints' bearer tokens)."""
    router = APIRouter()
    max_events = settings.api.max_events_per_request
    topic = settings.kafka.topics.engagement

    @router.post(
        "/v1/events",
        tags=["events"],
        dependencies=list(dependencies),
        status_code=202,
        response_model=EventsOut,
        responses={
            503: {"model": EventsOut, "description": "Some events failed (Kafka): send those again."},
            400: {"description": "empty_batch"},
            413: {"description": "too_many_events, or body_too_large (api.max_body_bytes)"},
            422: {"description": "invalid_request: the body is not {events: [...]}"},
        },
        openapi_extra=_request_body(max_events),
    )
    async def post_events(request: Request) -> Response:
        """Engagement events (the ``engagement`` topic's contract), answered for one by one: accepted
        once Kafka acknowledged them, rejected, duplicate (an event_id earlier in the batch) or failed."""
        try:
            items = read_batch(await request.body(), max_events)
        except BatchError as exc:
            return error_response(exc.status, exc.code, exc.message)
        results, valid = check_events(items, settings.feedback)
        if valid:
            records = [(e.song_id.encode(), e.to_bytes()) for _, e in valid]
            deliveries = await run_in_threadpool(producer.publish, topic, records)
            settle(results, [i for i, _ in valid], deliveries)
        return answer(results)

    return router
