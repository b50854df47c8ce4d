"""The one place where exceptions become gRPC status codes (KServe's
``ExceptionToStatusInterceptor`` shape).

``status_for`` is the mapping; ``ErrorInterceptor`` applies it to every unary RPC of the
server and tags each call with a request id (client metadata ``x-request-id`` or a fresh
one), returned in trailing metadata and attached to every log line of the call:

- ``InvalidInput``  -> INVALID_ARGUMENT with the exception's message
- ``ModelNotFound`` -> NOT_FOUND with the exception's message
- ``ModelNotReady`` -> UNAVAILABLE with the exception's message
- ``MessageTooLarge`` -> RESOURCE_EXHAUSTED (a reply over ``max_message_bytes``)
- ``RequestCancelled`` -> DEADLINE_EXCEEDED or CANCELLED (the handler stopped early)
- anything else     -> INTERNAL "internal error, request id X"; traceback logged with X

Requests over ``max_message_bytes`` never reach a handler: gRPC core refuses them while
they arrive (without buffering them) and answers RESOURCE_EXHAUSTED itself. To see them at
all, the interceptor serves each unary method as a stream-unary one (the wire protocol is
the same), so it runs as soon as a call starts; a call that ends before its request
message arrived, with its deadline not yet passed, is counted in
``marrowscope_oversized_messages_total{direction="received"}``. gRPC reports a client that
cancels half-way through sending a large message the same way, so that (rarer) case is
counted there too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from marrowscope.errors import InvalidInput, ModelNotFound, ModelNotReady
from services.runtime.handler import RequestCancelled
from services.runtime.logging import request_id
from services.runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class MessageTooLarge(Exception):
    """A reply that gRPC would refuse to send (over ``max_message_bytes``)."""


def status_for(exc: BaseException, rid: str | None = None) -> tuple[grpc.StatusCode, str]:
    """(status code, client-visible message) for an exception raised while serving."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, MessageTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, RequestCancelled):
        if exc.reason == "deadline":
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while running"
        return grpc.StatusCode.CANCELLED, "cancelled while running"
    return grpc.StatusCode.INTERNAL, f"internal error, request id {rid or request_id.get()}"


def status_label(exc: BaseException | None) -> str:
    """Metric label for an outcome: ``ok`` or the lower-case status name."""
    return "ok" if exc is None else status_for(exc)[0].name.lower()


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex


# grpc ships no type information, so its base class is Any to mypy
class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions of unary RPCs through ``status_for`` and counts requests refused
    for their size (module docstring); streams pass through."""

    def __init__(self, metrics: RuntimeMetrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        # messages are Any: one interceptor serves every method, each with its own types
        async def mapped(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                request = await anext(aiter(requests))
            except StopAsyncIteration:
                self._no_request(method, context)
                # gRPC core has already ended the call; nothing can be sent any more
                raise asyncio.CancelledError from None
            rid = _request_id(context)
            token = request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise  # the servicer already chose a status
            except Exception as exc:
                code, message = status_for(exc, rid)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("unhandled error in %s", method)
                else:
                    log.info("%s rejected: %s: %s", method, code.name, message)
                await context.abort(code, message)
            finally:
                request_id.reset(token)

        return grpc.stream_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _no_request(self, method: str, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            log.info("%s: deadline passed before the request arrived", method)
            return
        log.warning("%s: request refused before it was read (over max_message_bytes)", method)
        if self.metrics is not None:
            self.metrics.oversized.labels("received").inc()
