"""Signed webhook delivery from the persisted outbox.

Every finished analysis with a `webhook_url` gets an outbox row in the same transaction as
its final status, so a restart loses no notification. The dispatcher POSTs the JSON body
with these headers:

    X-MarrowScope-Event-Id:  outbox row id (stable across retries: deduplicate on it)
    X-MarrowScope-Timestamp: unix seconds when this attempt was signed
    X-MarrowScope-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

Receivers recompute the HMAC with the shared secret (`MS_GATEWAY_WEBHOOK_SECRET`), compare
in constant time and reject timestamps older than a few minutes (replay). Non-2xx answers
and transport errors are retried with exponential backoff (`WEBHOOK_BACKOFF_S * 2**n`,
capped at `WEBHOOK_BACKOFF_MAX_S`) up to `WEBHOOK_MAX_ATTEMPTS`, then the row is `dead`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MarrowScope-Signature"
TIMESTAMP_HEADER = "X-MarrowScope-Timestamp"
EVENT_HEADER = "X-MarrowScope-Event-Id"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300.0
) -> bool:
    """Receiver-side check (also used by the tests)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff_s(attempts: int, *, base: float, cap: float) -> float:
    """Delay before the next try after `attempts` failed ones."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


async def deliver(
    client, *, url: str, body: bytes, event_id: str, secret: str, timeout: float
) -> tuple[bool, str | None]:
    """One attempt; returns (delivered, error)."""
    import httpx

    ts = int(time.time())
    headers = {
        "Content-Type": "application/json",
        EVENT_HEADER: event_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
    }
    try:
        resp = await client.post(url, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if 200 <= resp.status_code < 300:
        return True, None
    return False, f"HTTP {resp.status_code}"
