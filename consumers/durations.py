"""Durations and times on the command line: one grammar for every command that takes them
(``retrain --every``, ``dead-letters --since``, ``evaluate-policy --since``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ranker.errors import ConfigError

#: A number and a unit: ``90s``, ``15m``, ``6h``, ``1.5d``, ``2w``. No sign, nan or inf.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_EXAMPLES = "a number and s, m, h, d or w (30m, 6h, 1w)"


def _seconds(text: str) -> float | None:
    match = _DURATION.match(text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()] if match else None


def parse_duration(text: str, flag: str) -> float:
    """A positive duration in seconds; ``flag`` names the option in the error. Zero is refused: every
    duration taken is a wait or a window, and a zero one reruns a job back to back or selects nothing."""
    seconds = _seconds(text)
    if seconds is None or not seconds > 0:
        raise ConfigError(f"{flag} {text!r}: give a positive duration: {_EXAMPLES}")
    return seconds


def parse_since(text: str, now: datetime | None = None, flag: str = "--since") -> datetime:
    """A point in time: a duration back from ``now`` (``2h``, ``7d``) or an RFC 3339 time (without a
    timezone: UTC)."""
    now = now or datetime.now(UTC)
    seconds = _seconds(text)
    if seconds is not None:
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: give an RFC 3339 time (2026-01-31T12:00:00Z; without a timezone, UTC) "
            f"or a duration back from now: {_EXAMPLES}"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
