"""The API's edge, in front of every route: the request body limit (413) and the per-route request
metrics (a pure ASGI middleware), and the JSON error body every error answer shares."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUESTS = Counter("apexrank_api_requests_total", "API requests", ["route", "method", "status"])
LATENCY = Histogram(
    "apexrank_api_request_seconds",
    "API request latency (server side)",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message}, status_code=status, headers=dict(headers) if headers else None
    )


class Edge:
    """Pure ASGI middleware: body size limit (413) and Prometheus metrics per route template."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                bounded = await self._bounded(scope, receive, sending)
                if bounded is None:
                    return
                receive = bounded
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(path, scope["method"], str(status)).inc()
            LATENCY.labels(path).observe(time.perf_counter() - t0)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the body up to the limit (it is small), answering 413 beyond it; replay it to the app."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body or declared < 0:
                    await self._too_large(scope, receive, send)
                    return None
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return None
            if not message.get("more_body", False):
                break
        replay = iter(chunks)

        async def replayed() -> Message:
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        return replayed

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large", f"request body exceeds {self.max_body} bytes")
        await response(scope, receive, send)
