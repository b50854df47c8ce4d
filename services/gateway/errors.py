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


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for the given status codes."""
    from services.gateway.schemas import ErrorPublic

    return {c: {"model": ErrorPublic} for c in codes}
