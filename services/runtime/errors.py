"""The one place where exceptions become gRPC status codes (KServe's
``ExceptionToStatusInterceptor`` shape).

``status_for`` is the mapping; ``ErrorInterceptor`` applies it to every unary RPC of the
server and tags each call with a request id (client metadata ``x-request-id`` or a fresh
one), returned in trailing metadata and attached to every log line of the call:

- ``InvalidInput``  -> INVALID_ARGUMENT with the exception's message
- ``ModelNotFound`` -> NOT_FOUND with the exception's message
- ``ModelNotReady`` -> UNAVAILABLE with the exception's message
- anything else     -> INTERNAL "internal error, request id X"; traceback logged with X
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable

import grpc

from marrowscope.errors import InvalidInput, ModelNotFound, ModelNotReady
from services.runtime.logging import request_id

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def status_for(exc: BaseException, rid: str | None = None) -> tuple[grpc.StatusCode, str]:
    """(status code, client-visible message) for an exception raised while serving."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error, request id {rid or request_id.get()}"


def status_label(exc: BaseException | None) -> str:
    """Metric label for an outcome: ``ok`` or the lower-case status name."""
    return "ok" if exc is None else status_for(exc)[0].name.lower()


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary RPCs through ``status_for``; streams pass through."""

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

        async def mapped(request, context: grpc.aio.ServicerContext):
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

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
