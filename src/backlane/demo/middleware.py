"""The demo's ASGI middleware: every request logged by a background job, request bodies
limited in size, and the browser-facing guards (security headers, no cross-site writes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app import Backlane
from . import tasks
from .db import now_iso

log = logging.getLogger("backlane.demo")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestLogMiddleware:
    """Logs every HTTP request (method, path, status, duration) by enqueueing a
    ``log_request`` job once the response has been sent: the client never waits for the
    log, and the entry is stored before the request's handling ends. Paths starting with
    one of ``skip`` (static files, the status polling) are not logged."""

    def __init__(self, app: ASGIApp, lane: Backlane, skip: Sequence[str] = ()) -> None:
        self.app = app
        self.lane = lane
        self.skip = tuple(skip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.skip):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        at = now_iso()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            duration_ms = round((time.perf_counter() - began) * 1000, 3)
            with anyio.CancelScope(shield=True):
                await self._log(at, scope["method"], scope["path"], status, duration_ms)

    async def _log(self, at: str, method: str, path: str, status: int, ms: float) -> None:
        task = self.lane.task_for(tasks.log_request).options(queue=tasks.REQUEST_LOG_QUEUE)
        try:
            await task.enqueue(at=at, method=method, path=path[:300], status=status, duration_ms=ms)
        except Exception:  # the log must never break a request
            log.exception("could not log the request %s %s", method, path[:300])


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is larger than its path's limit: at once when
    ``Content-Length`` says so, else as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, detail=_too_large_detail(limit))
            return message

        await self.app(scope, counted, send)


def _too_large_detail(limit: int) -> str:
    return f"request body larger than {limit} bytes"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_detail(limit)}, status_code=413)


class BrowserGuardMiddleware:
    """Adds security headers (a strict Content-Security-Policy: scripts and styles from this
    service only) to every response, and refuses with 403 a state-changing request that a
    page of another origin sent (its ``Origin`` header names a different host)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in _SAFE_METHODS and _cross_origin(Headers(scope=scope)):
            response = JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
            await response(scope, receive, self._with_headers(send))
            return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def sender(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        return sender


def _cross_origin(headers: Headers) -> bool:
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser page's request (curl, scripts, tests)
    host = headers.get("host", "")
    return origin.partition("://")[2].rstrip("/") != host
