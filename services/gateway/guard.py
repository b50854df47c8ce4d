"""The gateway's outermost ASGI layer: what must be decided before a request body is read.

A probe sent 300 MB without an API key and the gateway received and spooled all of it before
its 401; 32 valid 49 MB images (1.5 GB) were accepted; 300 bad keys got 300 401s. FastAPI
parses a multipart body before any dependency (the API-key check included) runs, so these
checks cannot live in the routes. For every request `RequestGuard`, in this order:

1. refuses a request whose credential, or whose client address, has used up its failed
   authentications (429 with Retry-After; `AuthFailureLimiter`,
   `MS_GATEWAY_AUTH_FAILURES_PER_MIN`). Failures are counted per presented key and per
   address separately, and a valid key is never refused for them: ten keyless requests
   from a shared address had locked every tenant's valid keys out of it;
2. for a request with a body under `/v1/`, checks from the headers that a valid API key is
   presented (401 without reading the body; scopes and the per-key rate limit are still the
   route's);
3. refuses a declared `Content-Length` over the path's limit (413 before reading) and counts
   the bytes as they stream, stopping at the limit (413, the rest is never read: chunked
   uploads cannot get around it); one code per limit (`errors.LIMITS`);
4. times out a body that stalls mid-stream for `MS_GATEWAY_BODY_IDLE_TIMEOUT_S` (408
   `body_timeout`; a slide upload's partial file is removed by its writer), counted in
   `marrowscope_gateway_body_timeouts_total`;
5. logs a client that disconnects mid-request at INFO and counts it
   (`marrowscope_gateway_client_disconnects_total`) instead of an ERROR traceback;
6. counts every response by route template and status
   (`marrowscope_gateway_http_requests_total`), times it
   (`marrowscope_gateway_http_request_duration_seconds{route,method,status_class}`), counts
   every rejection (`marrowscope_gateway_rejected_requests_total{route,status}`), and
   charges each 401 to its credential and client address;
7. after a large request returns freed heap to the OS (`malloc_trim`), so one burst of
   uploads does not leave the process at its peak size;
8. answers HEAD wherever GET is answered (FastAPI routes list GET only): the request runs
   as GET and the body is dropped, headers (Content-Length included) kept.

The client address is the TCP peer; X-Forwarded-For is honoured only from the proxies listed
in `MS_GATEWAY_TRUSTED_PROXIES` (uvicorn's proxy-headers middleware, configured in
`__main__`), so behind an ingress the peer is the real client and nobody else can choose it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import anyio
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import (
    AUTH_FAILURES,
    REQUEST_BYTES,
    UPLOAD_IDLE,
    CodedHTTPError,
    Limit,
)

log = logging.getLogger(__name__)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
TRIM_AFTER_BYTES = 8 * 1024 * 1024
"""Requests with a body at least this large are followed by malloc_trim (measured in
bench: without it RSS stays near its peak after four concurrent large submissions)."""
UNROUTED = "unrouted"
"""Route label of a path no route answers (ids in raw paths would explode the label set)."""


def body_too_large(limit: int, limit_of: Limit) -> CodedHTTPError:
    """Raised from `receive` when the streamed body passes the limit; FastAPI re-raises
    HTTPExceptions from body parsing, so the app's handler renders it with its code."""
    return CodedHTTPError(
        limit_of.status,
        limit_of.code,
        f"the request body is larger than {limit} bytes ({limit_of.setting})",
        {"connection": "close"},
    )


class AuthFailureLimiter:
    """Failed authentications per client (an address, or a presented credential): a token
    bucket of `per_min` failures, refilled at `per_min / 60` a second. Process-local, like
    the per-key limiter."""

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


def _keyed(scope: Scope) -> bool:
    """Whether the path is the API, whose failed authentications count."""
    return str(scope.get("path", "")).startswith("/v1/")


def _address_bucket(client: str) -> str:
    return f"addr:{client}"


def _credential_bucket(key: str) -> str:
    """A presented key's bucket, by digest: the limiter never holds a secret."""
    return "cred:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def route_templates(app: FastAPI) -> list[str]:
    """Every path template the app answers: the OpenAPI paths (included routers, whose
    routes FastAPI keeps behind include objects) plus the app's own routes (the OpenAPI
    document, /docs, the mounted Swagger assets)."""
    templates = list(app.openapi().get("paths", {}))
    for route in app.router.routes:
        path = getattr(route, "path", None)
        if path:
            templates.append(f"{path}/{{path:path}}" if isinstance(route, Mount) else path)
    return templates


class RouteLabels:
    """The route template of a request path, for metric labels (ids in raw paths would
    explode the label set): also for routes that set no `scope["route"]` and for requests
    refused before routing; `UNROUTED` when no route matches."""

    def __init__(self, templates: Callable[[], Iterable[str]]) -> None:
        self._templates = templates
        self._compiled: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, path: str, route: object = None) -> str:
        template = getattr(route, "path", None)
        if template and not isinstance(route, Mount):
            return str(template)
        if self._compiled is None:  # routes are complete only once the app serves
            self._compiled = [(compile_path(t)[0], t) for t in self._templates()]
        for regex, template in self._compiled:
            if regex.match(path):
                return template
        return UNROUTED


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
    (it reads the job store) run in a worker thread; `body_limits` maps a path to its own
    (bytes, Limit) instead of `MS_GATEWAY_MAX_REQUEST_BYTES`; `templates()` lists the app's
    route templates (`route_templates`) for the route label."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_bytes: int,
        key_is_valid: Callable[[str], bool],
        body_limits: Mapping[str, tuple[int, Limit]] | None = None,
        body_idle_timeout_s: float | None = None,
        auth_failures: AuthFailureLimiter,
        metrics=None,
        templates: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.body_limits = dict(body_limits or {})
        self.body_idle_timeout_s = body_idle_timeout_s
        self.key_is_valid = key_is_valid
        self.auth_failures = auth_failures
        self.metrics = metrics
        self.labels = RouteLabels(templates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        path = str(scope.get("path", ""))  # before routing: a Mount rewrites the scope
        client = (scope.get("client") or ("unknown", 0))[0]
        status = 500
        received = 0
        started = False
        body_done = False
        disconnected = False
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
            limit, limit_of = self._limit(scope)

            async def receive_limited() -> Message:
                nonlocal received, body_done, disconnected
                if body_done or not self.body_idle_timeout_s:
                    message = await receive()
                else:
                    try:
                        with anyio.fail_after(self.body_idle_timeout_s):
                            message = await receive()
                    except TimeoutError:
                        raise self._stalled(scope, received) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > limit:
                        raise body_too_large(limit, limit_of)
                elif message["type"] == "http.disconnect" and not started:
                    disconnected = True
                return message

            try:
                await self.app(scope, receive_limited, send_counted)
            except CodedHTTPError as exc:  # raised where no handler rendered it
                if started:
                    raise
                headers = tuple((exc.headers or {}).items())
                await _json(send_counted, exc.status_code, exc.code, exc.detail, headers)
            except ClientDisconnect:
                disconnected = True
        finally:
            label = self.labels(path, scope.get("route"))
            if disconnected:
                self._disconnected(scope, label, received)
            self._count(scope, label, status, client, time.perf_counter() - started_at)
            if received >= TRIM_AFTER_BYTES:
                await anyio.to_thread.run_sync(malloc_trim)

    def _stalled(self, scope: Scope, received: int) -> CodedHTTPError:
        label = self.labels(str(scope.get("path", "")), scope.get("route"))
        log.info(
            "request body stalled: %s %s sent nothing for %.0f s after %d bytes; closing",
            scope.get("method"),
            label,
            self.body_idle_timeout_s,
            received,
        )
        if self.metrics is not None:
            self.metrics.body_timeouts.labels(label).inc()
        return CodedHTTPError(
            UPLOAD_IDLE.status,
            UPLOAD_IDLE.code,
            f"the request body sent nothing for {self.body_idle_timeout_s:g} s "
            f"({UPLOAD_IDLE.setting}); nothing was kept",
            {"connection": "close"},
        )

    def _disconnected(self, scope: Scope, route: str, received: int) -> None:
        # a client that goes away is an event, not a server error: no traceback
        log.info(
            "client disconnected: %s %s after %d body bytes", scope.get("method"), route, received
        )
        if self.metrics is not None:
            self.metrics.disconnects.labels(route).inc()

    async def _refuse_early(self, scope: Scope, client: str) -> tuple | None:
        """(status, code, detail, headers) of a refusal decided from the headers alone."""
        if not _keyed(scope):
            return None
        headers = Headers(scope=scope)
        key, why = presented_key(headers)
        valid: bool | None = None  # checked at most once, and only where it decides
        if key is not None and self.auth_failures.wait_s(_credential_bucket(key)):
            # this exact credential failed repeatedly: a valid key never fails, so is never here
            return self._too_many(self.auth_failures.wait_s(_credential_bucket(key)))
        wait = self.auth_failures.wait_s(_address_bucket(client))
        if wait:
            # the address is over its failures; only a valid key is still let through
            valid = key is not None and await anyio.to_thread.run_sync(self.key_is_valid, key)
            if not valid:
                return self._too_many(wait)
        if scope.get("method") not in BODY_METHODS:
            return None
        if valid is None:
            valid = key is not None and await anyio.to_thread.run_sync(self.key_is_valid, key)
        if not valid:
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
        limit, limit_of = self._limit(scope)
        if declared > limit:
            return (
                limit_of.status,
                limit_of.code,
                f"the request body is {declared} bytes; the limit is {limit} ({limit_of.setting})",
                (("connection", "close"),),
            )
        return None

    @staticmethod
    def _too_many(wait: float) -> tuple:
        return (
            AUTH_FAILURES.status,
            AUTH_FAILURES.code,
            "too many requests with a missing or invalid API key from this address or with "
            f"this key ({AUTH_FAILURES.setting})",
            (("retry-after", str(int(wait))),),
        )

    def _limit(self, scope: Scope) -> tuple[int, Limit]:
        return self.body_limits.get(scope.get("path", ""), (self.max_request_bytes, REQUEST_BYTES))

    def _count(self, scope: Scope, label: str, status: int, client: str, seconds: float) -> None:
        if status == 401 and _keyed(scope):
            self.auth_failures.failed(_address_bucket(client))
            key, _ = presented_key(Headers(scope=scope))
            if key is not None:
                self.auth_failures.failed(_credential_bucket(key))
        if self.metrics is None:
            return
        method = scope.get("method", "")
        self.metrics.requests.labels(label, method, str(status)).inc()
        self.metrics.request_seconds.labels(label, method, f"{status // 100}xx").observe(seconds)
        if status >= 400:
            self.metrics.rejected.labels(label, str(status)).inc()
