"""Versioned event contracts on the Kafka topics (JSON, key = song_id)."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

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
    created_at: AwareDatetime
    title: str | None = Field(None, max_length=512)
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    prompt: str | None = Field(None, max_length=8192)
    duration_s: float | None = Field(None, ge=0)
    metadata: Annotated[dict[str, Any], AfterValidator(_json_safe)] = Field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> SongGenerated:
        """Parse a message value, turning every failure into an :class:`InputError`."""
        return parse_event(cls, raw)


class SongScored(_Event):
    """``songs.scored``: the APEX scores of a song. Version 1."""

    schema_version: Literal[1] = 1
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

    @classmethod
    def parse(cls, raw: bytes) -> Engagement:
        return parse_event(cls, raw)


class DeadLetter(_Event):
    """``songs.dead-letter`` (and ``engagement.dead-letter``): a message that could not be processed."""

    schema_version: Literal[1] = 1
    original: str
    original_encoding: Literal["utf-8", "base64"]
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
    ) -> DeadLetter:
        data = raw or b""
        encoding: Literal["utf-8", "base64"]
        try:
            original, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            original, encoding = base64.b64encode(data).decode("ascii"), "base64"
        key_text = None
        if key is not None:
            key_text = key.decode("utf-8", errors="backslashreplace")
        return cls(
            original=original,
            original_encoding=encoding,
            key=key_text,
            source_topic=topic,
            partition=partition,
            offset=offset,
            error_code=str(code),
            message=message[:2000],
        )

    def original_bytes(self) -> bytes:
        if self.original_encoding == "base64":
            return base64.b64decode(self.original)
        return self.original.encode("utf-8")


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
