"""Error codes for input that cannot be scored (each names a dead-letter reason), and the errors that stop a process."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    INVALID_CREATED_AT = "invalid_created_at"
    INVALID_TS = "invalid_ts"
    KEY_MISMATCH = "key_mismatch"
    UNSUPPORTED_URI_SCHEME = "unsupported_uri_scheme"
    FORBIDDEN_URI = "forbidden_uri"
    FILE_NOT_FOUND = "file_not_found"
    HTTP_ERROR = "http_error"
    FETCH_TIMEOUT = "fetch_timeout"
    TOO_LARGE = "too_large"
    UNDECODABLE_AUDIO = "undecodable_audio"
    EMPTY_AUDIO = "empty_audio"
    SILENT_AUDIO = "silent_audio"
    TOO_SHORT = "too_short"
    DEVICE_OUT_OF_MEMORY = "device_out_of_memory"  # transient: retried like a fetch before its letter
    INTERNAL_ERROR = "internal_error"


class InputError(Exception):
    """A message or its audio cannot be scored.

    ``transient`` says the same input may succeed later (an audio host's 5xx, 429, a timeout,
    a refused or reset connection): the worker retries it with backoff (``consumers.retries``)
    before dead-lettering it. Everything else is permanent and dead-lettered at once.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, transient: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.transient = transient
        #: How long the source asked to be left alone (an HTTP Retry-After), for a transient error.
        self.retry_after_s = retry_after_s


class ConfigError(Exception):
    """The process cannot start with the settings it was given; the message says what to change."""


class DeviceFault(Exception):
    """The accelerator failed for good in this process (a sticky CUDA error: an illegal memory access,
    a device-side assert, an ECC fault): every later call fails as well, whatever the song.

    No song is at fault, so none gets a dead letter: the worker stops with the batch uncommitted and
    exits non-zero, and the restart that redelivers the batch gets a fresh device context.
    """
