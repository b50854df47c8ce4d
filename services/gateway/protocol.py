"""uvicorn's HTTP protocol with the API's error shape on the errors it answers itself.

A request uvicorn cannot parse (a body longer than its Content-Length runs into the next
"request", a malformed request line or header) never reaches the app: uvicorn writes a
plain-text 400 and closes. The LIS parses every error as `{"error", "detail"}`, so this
subclass writes that shape instead; everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import json

STATUS_LINE = b"HTTP/1.1 400 Bad Request\r\n"


def bad_request_bytes(msg: str) -> bytes:
    """A complete `400 bad_request` response that closes the connection."""
    body = json.dumps(
        {"error": "bad_request", "detail": f"{msg} (malformed HTTP; the connection is closed)"}
    ).encode()
    head = (
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return STATUS_LINE + head + body


def json_error_protocol() -> type[asyncio.Protocol]:
    """The protocol uvicorn's `http="auto"` would pick (httptools when installed, else h11),
    answering its own 400s as JSON."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class JsonErrorProtocol(Base):  # type: ignore[misc,valid-type]
        def send_400_response(self, msg: str) -> None:
            # the connection is closed right after, so no parser state needs to follow
            self.transport.write(bad_request_bytes(msg))
            self.transport.close()

    return JsonErrorProtocol
