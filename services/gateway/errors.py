"""The one HTTP error type of the API, rendered as `{"error": code, "detail": text}`, and
the one code each configured limit answers with (`LIMITS`, the table in docs/SERVICES.md)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException


class ApiError(Exception):
    def __init__(
        self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = headers


class CodedHTTPError(HTTPException):
    """An `ApiError` that is raised from inside `receive` (body too large, stalled upload):
    FastAPI re-raises only HTTPExceptions from body parsing (anything else becomes a bare
    400), so these are HTTPExceptions that carry their own code."""

    def __init__(
        self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail, headers)
        self.code = code


@dataclass(frozen=True)
class Limit:
    """A configured limit and the one error it answers with."""

    setting: str
    status: int
    code: str
    what: str

    def error(self, detail: str, headers: dict[str, str] | None = None) -> ApiError:
        return ApiError(self.status, self.code, f"{detail} ({self.setting})", headers)


REQUEST_BYTES = Limit(
    "MS_GATEWAY_MAX_REQUEST_BYTES",
    413,
    "request_too_large",
    "the whole body of any request but a slide upload (declared Content-Length: before "
    "reading; streamed: at the limit)",
)
SLIDE_BYTES = Limit(
    "MS_GATEWAY_MAX_SLIDE_BYTES",
    413,
    "slide_too_large",
    "the body of `PUT /v1/slide-uploads`, and a referenced slide file",
)
UPLOAD_BYTES = Limit(
    "MS_GATEWAY_MAX_UPLOAD_BYTES", 413, "image_too_large", "one image file of a submission"
)
IMAGES = Limit(
    "MS_GATEWAY_MAX_IMAGES", 413, "too_many_images", "images of a case of fields of view"
)
CELL_IMAGES = Limit(
    "MS_GATEWAY_MAX_CELL_IMAGES",
    413,
    "too_many_images",
    'images of a single-cell case (`"input": "cells"`); also the multipart parser\'s file limit',
)
CASE_PIXELS = Limit(
    "MS_GATEWAY_MAX_CASE_PIXELS",
    413,
    "case_too_large",
    "pixels of all images of a case together, read from the image headers",
)
METADATA_BYTES = Limit(
    "MS_GATEWAY_MAX_METADATA_BYTES", 413, "metadata_too_large", "the `metadata` JSON part"
)
PIXELS = Limit(
    "MS_GATEWAY_MAX_PIXELS",
    422,
    "invalid_image",
    "pixels of one image (a decompression bomb is an invalid image)",
)
CELL_IMAGE_PIXELS = Limit(
    "MS_GATEWAY_MAX_CELL_IMAGE_PIXELS",
    422,
    "not_a_cell_image",
    "pixels of one image of a single-cell case (larger: a field of view sent as a cell)",
)
UPLOAD_IDLE = Limit(
    "MS_GATEWAY_BODY_IDLE_TIMEOUT_S",
    408,
    "body_timeout",
    "seconds a request body may stall mid-stream; a partial slide upload is removed",
)
RATE = Limit(
    "MS_GATEWAY_RATE_LIMIT_PER_MIN", 429, "rate_limited", "requests per API key and minute"
)
AUTH_FAILURES = Limit(
    "MS_GATEWAY_AUTH_FAILURES_PER_MIN",
    429,
    "too_many_failed_authentications",
    "missing/invalid API keys per client address, and per presented key, and minute "
    "(a valid key is never refused for them)",
)
LIMITS: tuple[Limit, ...] = (
    REQUEST_BYTES,
    SLIDE_BYTES,
    UPLOAD_BYTES,
    IMAGES,
    CELL_IMAGES,
    CASE_PIXELS,
    METADATA_BYTES,
    PIXELS,
    CELL_IMAGE_PIXELS,
    UPLOAD_IDLE,
    RATE,
    AUTH_FAILURES,
)


HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "body_timeout",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def http_error_code(status: int) -> str:
    """The `error` code of a framework error (unknown route, wrong method, bad body)."""
    return HTTP_ERROR_CODES.get(status, "client_error" if status < 500 else "internal_error")


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for the given status codes."""
    from services.gateway.schemas import ErrorPublic

    return {c: {"model": ErrorPublic} for c in codes}
