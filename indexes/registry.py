"""Backends registered by URL scheme (Gorse-style): one lookup for every store kind."""

from __future__ import annotations

import importlib
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel

#: The schemes the Redis backends serve (one node, or a cluster).
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


class Backend(Protocol):
    """What a registered backend class offers: its config model and a constructor from it."""

    config_type: type[BaseModel]

    @classmethod
    def from_config(cls, config: Any) -> Any: ...


def open_backend(kind: str, table: dict[str, str], url: str, options: dict[str, Any]) -> Any:
    """The backend ``table`` registers for ``url``'s scheme ("module:Class", imported now), made from its
    config; ValueError naming the schemes served, never the URL (it may hold a password)."""
    scheme = urlsplit(url).scheme.lower()
    target = table.get(scheme)
    if target is None:
        supported = ", ".join(f"{s}://" for s in table)
        shown = f"{scheme}://" if scheme else "(none)"
        raise ValueError(f"unsupported {kind} URL scheme {shown}: use {supported}")
    module, _, name = target.partition(":")
    backend: Backend = getattr(importlib.import_module(module), name)
    return backend.from_config(backend.config_type(url=url, **options))
