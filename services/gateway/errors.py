"""The one HTTP error type of the API, rendered as `{"error": code, "detail": text}`."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(
        self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = headers


HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
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
