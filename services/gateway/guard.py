"""The gateway's outermost ASGI layer: what must be decided before a request body is read.

A probe sent 300 MB without an API key and the gateway received and spooled all of it before
its 401; 32 valid 49 MB images (1.5 GB) were accepted; 300 bad keys got 300 401s. FastAPI
parses a multipart body before any dependency (the API-key check included) runs, so these
checks cannot live in the routes. For every request `RequestGuard`, in this order:

1. refuses a client address that has used up its failed authentications (429 with
   Retry-After; `AuthFailureLimiter`, `MS_GATEWAY_AUTH_FAILURES_PER_MIN`) before anything;
2. for a request with a body under `/v1/`, checks from the headers that a valid API key is
   presented (401 without reading the body; scopes and the per-key rate limit are still the
   route's);
3. refuses a declared `Content-Length` over `MS_GATEWAY_MAX_REQUEST_BYTES` (413 before
   reading) and counts the bytes as they stream, stopping at the limit (413, the rest is
   never read: chunked uploads cannot get around it);
4. counts every response by route and status (`marrowscope_gateway_http_requests_total`)
   and every rejection (`marrowscope_gateway_rejected_requests_total{route,status}`), and
   charges each 401 to the client address;
5. after a large request returns freed heap to the OS (`malloc_trim`), so one burst of
   uploads does not leave the process at its peak size;
6. answers HEAD wherever GET is answered (FastAPI routes list GET only): the request runs
   as GET and the body is dropped, headers (Content-Length included) kept.

The client address is the TCP peer; behind an ingress run uvicorn with `--proxy-headers`
and `--forwarded-allow-ips` set to the ingress so the peer is the real client.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
TRIM_AFTER_BYTES = 8 * 1024 * 1024
"""Requests with a body at least this large are followed by malloc_trim (measured in
bench: without it RSS stays near its peak after four concurrent large submissions)."""


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the streamed body passes the limit; FastAPI re-raises
    HTTPExceptions from body parsing, so the app's handler renders it as JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes (MS_GATEWAY_MAX_REQUEST_BYTES)"
        )


class AuthFailureLimiter:
    """Failed authentications per client address: a token bucket of `per_min` failures,
    refilled at `per_min / 60` a second. Process-local, like the per-key limiter."""

    def __init__(self, per_min: int, *, max_clients: int = 100_000) -> None:
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _tokens(self, client: str, t: float) -> float:
        tokens, last = self._buckets.get(client, (self.capacity, t))
        return min(self.capacity, tokens + (t - last) * self.rate)

    def wait_s(self, client: str) -> float:
        """0 when the client may try to authenticate, else seconds until it may."""
        with self._lock:
            tokens = self._tokens(client, time.monotonic())
        return 0.0 if tokens >= 1.0 else max(1.0, math.ceil((1.0 - tokens) / self.rate))

    def failed(self, client: str) -> None:
        with self._lock:
            t = time.monotonic()
            if len(self._buckets) >= self.max_clients:  # bounded memory under a spray
                self._buckets.clear()
            self._buckets[client] = (max(0.0, self._tokens(client, t) - 1.0), t)


def presented_key(headers: Headers) -> tuple[str | None, str | None]:
    """(the API key, None) from `X-API-Key` or `Authorization: Bearer`, else (None, why)."""
    header = headers.get("x-api-key") or None
    auth = headers.get("authorization", "")
    scheme, _, credentials = auth.partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    given = {k for k in (header, bearer) if k}
    if len(given) > 1:
        return None, "send one API key: Authorization: Bearer or X-API-Key, not two different ones"
    if not given:
        return None, "an API key is required"
    return given.pop(), None


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc only; a no-op elsewhere)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()


async def _json(send: Send, status: int, code: str, detail: str, headers=()) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in headers),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware; see the module docstring. `key_is_valid(key)` is a blocking check
    (it reads the job store) run in a worker thread."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_bytes: int,
        key_is_valid: Callable[[str], bool],
        body_limits: Mapping[str, int] | None = None,
        auth_failures: AuthFailureLimiter,
        metrics=None,
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.body_limits = dict(body_limits or {})
        self.key_is_valid = key_is_valid
        self.auth_failures = auth_failures
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        status = 500
        received = 0
        started = False
        head = scope.get("method") == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            refused = await self._refuse_early(scope, client)
            if refused is not None:
                await _json(send_counted, *refused)
                return
            limit = self._limit(scope)

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, receive_limited, send_counted)
            except BodyTooLarge as exc:  # raised where no handler rendered it
                if started:
                    raise
                await _json(send_counted, 413, "request_too_large", exc.detail)
        finally:
            self._count(scope, status, client)
            if received >= TRIM_AFTER_BYTES:
                await anyio.to_thread.run_sync(malloc_trim)

    async def _refuse_early(self, scope: Scope, client: str) -> tuple | None:
        """(status, code, detail, headers) of a refusal decided from the headers alone."""
        path: str = scope.get("path", "")
        if not path.startswith("/v1/"):
            return None
        wait = self.auth_failures.wait_s(client)
        if wait:
            return (
                429,
                "too_many_failed_authentications",
                "too many requests with a missing or invalid API key from this address",
                (("retry-after", str(int(wait))),),
            )
        headers = Headers(scope=scope)
        if scope.get("method") not in BODY_METHODS:
            return None
        key, why = presented_key(headers)
        if key is None or not await anyio.to_thread.run_sync(self.key_is_valid, key):
            return (
                401,
                "unauthenticated",
                why or "invalid or revoked API key",
                (("www-authenticate", "Bearer"),),
            )
        try:
            declared = int(headers.get("content-length", ""))
        except ValueError:
            return None
        limit = self._limit(scope)
        if declared > limit:
            return (
                413,
                "request_too_large",
                f"the request body is {declared} bytes; the limit is {limit} "
                f"({self._limit_setting(scope)})",
                (("connection", "close"),),
            )
        return None

    def _limit(self, scope: Scope) -> int:
        return self.body_limits.get(scope.get("path", ""), self.max_request_bytes)

    def _limit_setting(self, scope: Scope) -> str:
        if scope.get("path", "") in self.body_limits:
            return "MS_GATEWAY_MAX_SLIDE_BYTES"
        return "MS_GATEWAY_MAX_REQUEST_BYTES"

    def _count(self, scope: Scope, status: int, client: str) -> None:
        if status == 401 and scope.get("path", "").startswith("/v1/"):
            self.auth_failures.failed(client)
        if self.metrics is None:
            return
        # the route template, never the raw path (ids would explode the label set);
        # "unrouted": refused here before routing, or no such route
        label = getattr(scope.get("route"), "path", None) or "unrouted"
        self.metrics.requests.labels(label, scope.get("method", ""), str(status)).inc()
        if status >= 400:
            self.metrics.rejected.labels(label, str(status)).inc()
