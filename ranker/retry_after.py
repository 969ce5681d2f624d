"""HTTP ``Retry-After`` in seconds: the worker's audio fetch and the API clients read it alike."""

from __future__ import annotations

import time
from datetime import UTC
from email.utils import parsedate_to_datetime


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After (delta-seconds or an HTTP-date) in seconds from ``now``; None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # isdigit alone accepts '²', which float refuses
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
