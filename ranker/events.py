"""Versioned event contracts on the Kafka topics (JSON, key = song_id; ``feeds.served``: key = request_id)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ranker.errors import ErrorCode, InputError

E = TypeVar("E", bound=BaseModel)

SONG_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SONG_ID_RE = re.compile(SONG_ID_PATTERN)

#: The seven APEX outputs, in the head's order.
POPULARITY_TASKS: tuple[str, ...] = ("streams", "likes")
AESTHETIC_TASKS: tuple[str, ...] = ("coherence", "musicality", "memorability", "clarity", "naturalness")
TASKS: tuple[str, ...] = POPULARITY_TASKS + AESTHETIC_TASKS


def _check_uri(value: str) -> str:
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if not scheme or (not value[len(scheme) + 1 :].startswith("//") and scheme != "file"):
        raise ValueError("audio_uri must be an absolute URI such as file:///path or https://host/path")
    return value


_RFC3339_START = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")


def _rfc3339_text(value: Any) -> Any:
    """Timestamps travel as RFC 3339 text: a number (or a string of digits) is refused, not guessed to be
    (milli)seconds since the epoch, as pydantic would."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339_START.match(value):
        raise ValueError("must be an RFC 3339 timestamp string with a timezone, e.g. 2026-01-31T12:00:00Z")
    return value


#: An RFC 3339 timestamp with a timezone; numbers are refused.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]

SongId = Annotated[str, Field(pattern=SONG_ID_PATTERN, description="1-128 letters, digits or ._:-")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    """Metadata must survive a JSON round trip (no NaN or Infinity hidden inside)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise ValueError("metadata must be finite JSON (no NaN or Infinity)") from exc
    return value


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class SongGenerated(_Event):
    """``songs.generated``: a song has just been generated. Version 1."""

    schema_version: Literal[1] = 1
    song_id: SongId
    audio_uri: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_check_uri)]
    generator: str = Field(min_length=1, max_length=64, description="e.g. suno-v5")
    created_at: Timestamp
    title: str | None = Field(None, max_length=512)
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    prompt: str | None = Field(None, max_length=8192)
    duration_s: float | None = Field(None, ge=0)
    metadata: Annotated[dict[str, Any], AfterValidator(_json_safe)] = Field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> SongGenerated:
        """Parse a message value, turning every failure into an :class:`InputError`.

        A bad ``created_at`` has its own code: it decides a song's freshness for its whole life.
        """
        try:
            return parse_event(cls, raw)
        except InputError as exc:
            only_created_at = exc.message.startswith("created_at:") and ";" not in exc.message
            if exc.code == ErrorCode.INVALID_SCHEMA and only_created_at:
                raise InputError(ErrorCode.INVALID_CREATED_AT, exc.message) from exc
            raise

    def check_created_at(self, now: datetime, max_skew_s: float, earliest: datetime) -> None:
        """Refuse a creation time in the future (beyond clock skew) or before ``earliest``."""
        check_time(
            "created_at",
            self.created_at,
            now,
            max_skew_s,
            earliest,
            ErrorCode.INVALID_CREATED_AT,
            "a song's freshness is measured from it",
        )


class SongScored(_Event):
    """``songs.scored``: the APEX scores of a song. Versions 1 and 2.

    Version 2 adds optional uncertainty fields (issue 17): the ensemble's ``spread`` per task
    and ``like_rate_sd`` of the prior like rate (a model with several heads), and the
    ``ood_percentile`` (0-100) and ``ood`` flag (a model with an OOD model). Producers write
    version 2 only when one of them is present, so a model without them still publishes
    version 1 byte for byte; readers accept both. A version 1 event carries none of them.
    """

    schema_version: Literal[1, 2] = 1
    song_id: SongId
    model_version: str
    streams: float
    likes: float
    coherence: float
    musicality: float
    memorability: float
    clarity: float
    naturalness: float
    rank_score: float
    scored_at: AwareDatetime
    generator: str | None = None
    truncated: bool = False
    untrained: bool = Field(False, description="An untrained, seeded head made these scores (model.allow_untrained).")
    spread: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="v2: the ensemble's standard deviation over its heads, per task of the model."
    )
    like_rate_sd: float | None = Field(None, ge=0, description="v2: the ensemble's sd of the prior like rate.")
    ood_percentile: float | None = Field(
        None, ge=0, le=100, description="v2: distance to the training songs as a percentile of held-out ones."
    )
    ood: bool | None = Field(None, description="v2: ood_percentile above the configured flag percentile.")

    @model_validator(mode="after")
    def _version(self) -> SongScored:
        extra = (self.spread, self.like_rate_sd, self.ood_percentile, self.ood)
        if self.schema_version == 1 and any(v is not None for v in extra):
            raise ValueError("spread, like_rate_sd, ood_percentile and ood need schema_version 2")
        if self.spread is not None and any(t not in TASKS for t in self.spread):
            raise ValueError(f"spread names unknown tasks; known: {list(TASKS)}")
        return self

    @classmethod
    def parse(cls, raw: bytes) -> SongScored:
        return parse_event(cls, raw)


EngagementType = Literal["play", "complete", "like", "unlike", "skip", "share"]


class Engagement(_Event):
    """``engagement``: one user interaction with a song. Version 1."""

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    song_id: SongId
    user_id: str = Field(min_length=1, max_length=128)
    type: EngagementType
    ts: AwareDatetime
    feed: str | None = Field(None, max_length=64)
    position: int | None = Field(
        None, ge=0, le=2**31 - 1, description="0-based rank at which the song was shown (the log keeps int32)"
    )
    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The feed or rank response that showed the song (its request_id): joins the event to what "
        "was served, where and why.",
    )

    @classmethod
    def parse(cls, raw: bytes) -> Engagement:
        return parse_event(cls, raw)

    def check_ts(self, now: datetime, max_skew_s: float, earliest: datetime) -> None:
        """Refuse an event time in the future (beyond clock skew) or before ``earliest``: a listener's
        taste decays by event time (a far future one would wipe it and outweigh every later event),
        and the engagement log files and prunes by it."""
        why = "a listener's taste decays by it and the engagement log is dated by it"
        check_time("ts", self.ts, now, max_skew_s, earliest, ErrorCode.INVALID_TS, why)


def check_time(
    name: str, value: datetime, now: datetime, max_skew_s: float, earliest: datetime, code: ErrorCode, why: str
) -> None:
    """Refuse a client-supplied time more than ``max_skew_s`` ahead of ``now``, or before ``earliest``."""
    if (value - now).total_seconds() > max_skew_s:
        raise InputError(
            code,
            f"{name} {value.isoformat()} is in the future (more than {max_skew_s:g} s ahead of "
            f"{now.isoformat(timespec='seconds')}); {why}",
        )
    if value < earliest:
        raise InputError(code, f"{name} {value.isoformat()} is before {earliest.isoformat()}, the earliest accepted")


class SongDeleted(_Event):
    """``songs.deleted``: a song was taken down (rights claim, abuse). Version 1.

    The score store already holds its tombstone when this is published; each worker removes
    the song's embedding from its own shard's store, and the index catch-up drops the vector.
    """

    schema_version: Literal[1] = 1
    song_id: SongId
    reason: str = Field(min_length=1, max_length=256)
    deleted_at: Timestamp

    @classmethod
    def parse(cls, raw: bytes) -> SongDeleted:
        return parse_event(cls, raw)


#: Most bytes of a failed message embedded in its dead letter unless a caller says otherwise.
DEFAULT_DEAD_LETTER_ORIGINAL_BYTES = 65_536


class DeadLetter(_Event):
    """``songs.dead-letter`` (and ``engagement.dead-letter``): a message that could not be processed.

    Version 2 bounds the embedded original so that a dead letter always fits on its topic:
    at most a configured number of bytes of it, with the full length and sha256 beside them
    to match it against the source topic. Version 1 letters (whole originals) still parse.
    """

    schema_version: Literal[1, 2] = 2
    original: str
    original_encoding: Literal["utf-8", "base64"]
    original_length: int | None = Field(None, ge=0, description="Bytes of the whole original value.")
    original_sha256: str | None = Field(None, description="sha256 of the whole original value, hex.")
    original_truncated: bool = Field(False, description="original holds only the first bytes of the value.")
    key: str | None = None
    source_topic: str
    partition: int
    offset: int
    error_code: str
    message: str
    failed_at: AwareDatetime = Field(default_factory=utcnow)

    @classmethod
    def build(
        cls,
        raw: bytes | None,
        *,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        code: ErrorCode | str,
        message: str,
        max_original_bytes: int = DEFAULT_DEAD_LETTER_ORIGINAL_BYTES,
    ) -> DeadLetter:
        data = raw or b""
        original, encoding, truncated = _bounded_text(data, max_original_bytes)
        key_text = None
        if key is not None:
            key_text = key[:_MAX_KEY_BYTES].decode("utf-8", errors="backslashreplace")
        return cls(
            original=original,
            original_encoding=encoding,
            original_length=len(data),
            original_sha256=hashlib.sha256(data).hexdigest(),
            original_truncated=truncated,
            key=key_text,
            source_topic=topic,
            partition=partition,
            offset=offset,
            error_code=str(code),
            message=message[:2000],
        )

    def without_original(self) -> DeadLetter:
        """This letter with none of the original embedded (its length and hash stay)."""
        return self.model_copy(update={"original": "", "original_encoding": "utf-8", "original_truncated": True})

    def original_bytes(self) -> bytes:
        if self.original_encoding == "base64":
            return base64.b64decode(self.original)
        return self.original.encode("utf-8")


#: A dead letter's key is shown, not used: a key past this many bytes is cut.
_MAX_KEY_BYTES = 1024


def _bounded_text(data: bytes, limit: int) -> tuple[str, Literal["utf-8", "base64"], bool]:
    """At most ``limit`` bytes of ``data`` as text where that stays compact in JSON, else as base64.

    Text whose JSON escaping would more than double it (control bytes become six
    characters each) travels as base64 instead, so the letter's size stays near the budget.
    """
    head = data[:limit]
    truncated = len(head) < len(data)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut in the middle of a character is not a reason for base64: drop the partial tail.
        if truncated and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            text = head[: exc.start].decode("utf-8", errors="strict")
        else:
            return base64.b64encode(head).decode("ascii"), "base64", truncated
    if len(json.dumps(text, ensure_ascii=False).encode()) > 2 * len(head) + 2:
        return base64.b64encode(head).decode("ascii"), "base64", truncated
    return text, "utf-8", truncated


def parse_event(cls: type[E], raw: bytes | None) -> E:
    """Validate a JSON message value as ``cls``; bad JSON and schema errors become InputErrors."""
    if raw is None:
        raise InputError(ErrorCode.INVALID_JSON, "message has no value")
    try:
        event: E = cls.__pydantic_validator__.validate_json(raw)  # model_validate_json, minus a call
        return event
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise InputError(ErrorCode.INVALID_JSON, f"value is not JSON: {errors[0]['msg']}") from exc
        if errors and errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise InputError(ErrorCode.INVALID_SCHEMA, "expected a JSON object") from exc
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors)
        raise InputError(ErrorCode.INVALID_SCHEMA, problems) from exc


def is_valid_song_id(value: str) -> bool:
    return bool(_SONG_ID_RE.match(value))


#: Most songs one served record lists (a page or a rerank; the API's limits are far below it).
MAX_SERVED_ITEMS = 2_000
RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]


class FeedServed(_Event):
    """``feeds.served`` (key = request_id): what one feed or rank response showed, where and why. Version 1.

    ``song_ids`` are in page order (position = index, 0-based within the response); ``explored``
    and ``propensity`` run beside them: the probability that the logging policy put that song in
    an exploration slot of this page given ``pool`` (1.0 for exploit items and rank responses).
    ``pool``: the exploration pool, in the feed's order (empty when nothing was explored).
    """

    schema_version: Literal[1] = 1
    request_id: RequestId
    served_at: Timestamp
    kind: Literal["feed", "rank"]
    feed: str = Field(min_length=1, max_length=64)
    user_id: str | None = Field(None, min_length=1, max_length=128)
    arm: str | None = Field(None, min_length=1, max_length=64)
    model_version: str | None = Field(None, max_length=256)
    song_ids: list[SongId] = Field(max_length=MAX_SERVED_ITEMS)
    explored: list[bool] = Field(max_length=MAX_SERVED_ITEMS)
    propensity: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(max_length=MAX_SERVED_ITEMS)
    pool: list[SongId] = Field(default_factory=list, max_length=MAX_SERVED_ITEMS)

    @model_validator(mode="after")
    def _per_item(self) -> FeedServed:
        n = len(self.song_ids)
        if len(self.explored) != n or len(self.propensity) != n:
            raise ValueError(
                f"song_ids, explored and propensity must have one entry per item "
                f"({n}, {len(self.explored)}, {len(self.propensity)})"
            )
        if any(p != 1.0 for p, e in zip(self.propensity, self.explored, strict=True) if not e):
            raise ValueError("an exploit item's propensity must be 1.0")
        if any(self.explored) and not self.pool:
            raise ValueError("explored items need the pool they were drawn from")
        return self

    @classmethod
    def parse(cls, raw: bytes) -> FeedServed:
        return parse_event(cls, raw)
