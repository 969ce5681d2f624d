"""The API's JSON bodies: compact (orjson where it can), and never a NaN or an infinity, which JSON has
not; where one is, the path to it, so that the caller can tell a bad inline policy from a bug."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import Response


def json_response(
    data: Any, status: int = 200, *, finite: bool = False, headers: dict[str, str] | None = None
) -> Response:
    """``data`` as compact JSON; ValueError if it holds a NaN or an infinity (JSON has neither).

    orjson writes non-finite floats as null, so a body with a null in it is walked for them
    (a NaN and a real null are told apart on ``data``; a body without one cannot hold a
    non-finite number); ``finite=True``: the caller has checked. What orjson refuses
    (integers beyond 64 bits, non-str keys, float subclasses) goes through json.dumps.
    """
    try:
        body = orjson.dumps(data)
    except TypeError:
        body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    else:
        if not finite and b"null" in body and first_non_finite(data) is not None:
            raise ValueError("Out of range float values are not JSON compliant")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def first_non_finite(data: Any, path: str = "") -> str | None:
    """Where the first NaN or infinity in a JSON-like value is (``items.3.components.posterior_rate``)."""
    if isinstance(data, float):
        return None if math.isfinite(data) else path or "value"
    if isinstance(data, Mapping):
        items: Any = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
