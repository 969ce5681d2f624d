"""The clients' ``send_events`` without I/O: its result types, and the rounds of one call (which events
are still to send, each answer merged back by index). The clients in :mod:`ranker.serving.client` send."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client does not load pydantic: an Engagement is sent by its model_dump
    from ranker.events import Engagement

EVENTS_PATH = "/v1/events"


@dataclass(frozen=True)
class EventResult:
    """What became of one event of a ``send_events`` call (``index``: its position in the call's list).

    ``status``: ``accepted`` (Kafka acknowledged it), ``rejected`` (invalid, ``code`` and ``message``
    say why; sending it again cannot help), ``duplicate`` (its event_id came earlier in the call, at
    ``duplicate_of``) or ``failed`` (not in after the retries: send it again later). A ``failed``
    with code ``unreachable`` was never answered for: it may be one the server would reject, which
    sending it again tells (and counts it once if it did get in).
    """

    index: int
    event_id: str | None
    status: str
    code: str | None = None
    message: str | None = None
    duplicate_of: int | None = None


@dataclass(frozen=True)
class EventsResult:
    results: list[EventResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def accepted(self) -> int:
        return self.count("accepted")

    @property
    def failed(self) -> int:
        return self.count("failed")


class EventRounds:
    """One ``send_events`` call: the events still to send, and each attempt's answers merged back."""

    def __init__(self, events: Sequence[Engagement | Mapping[str, Any]]) -> None:
        self.payload = [
            e.model_dump(mode="json", exclude_none=True) if hasattr(e, "model_dump") else dict(e) for e in events
        ]
        self.results: list[EventResult | None] = [None] * len(self.payload)
        self.pending = list(range(len(self.payload)))

    def body(self) -> dict[str, Any]:
        """The next request's body: the events not in yet."""
        return {"events": [self.payload[i] for i in self.pending]}

    def merge(self, body: Mapping[str, Any]) -> None:
        """Take an answer's per-event results (indexes into what was sent) as the events' own."""
        sent = self.pending
        for r in body["results"]:
            i = sent[int(r["index"])]
            error = r.get("error") or {}
            dup = r.get("duplicate_of")
            self.results[i] = EventResult(
                i,
                r.get("event_id"),
                str(r["status"]),
                error.get("code"),
                error.get("message"),
                sent[int(dup)] if dup is not None else None,
            )
        self.pending = [i for i in sent if (r := self.results[i]) is None or r.status == "failed"]

    def outcome(self, code: str = "", message: str = "") -> EventsResult:
        """The results so far; an event never answered for is failed with ``code``."""
        return EventsResult(
            [
                r if r is not None else EventResult(i, self.payload[i].get("event_id"), "failed", code, message)
                for i, r in enumerate(self.results)
            ]
        )
