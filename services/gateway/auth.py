"""API keys with scopes, stored hashed, and a per-key token-bucket rate limit.

A key reads `ms_<id>_<secret>`: `<id>` finds the row, and the row stores only
`HMAC-SHA256(salt, secret)` with a random per-key salt, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.gateway.db import DEFAULT_TENANT, ApiKey, now

SCOPES: tuple[str, ...] = ("submit", "read", "ops", "admin")
"""`ops`: operational detail only (`/metrics`, `/readyz`'s per-model detail), for monitoring
that cannot use the separate metrics port; it reads no analysis."""
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a key of one tenant. An `admin` key sees every tenant."""

    key_id: str
    name: str
    scopes: frozenset[str]
    tenant: str = DEFAULT_TENANT

    @property
    def sees_all(self) -> bool:
        return "admin" in self.scopes

    @property
    def visible_tenant(self) -> str | None:
        """The tenant reads are limited to; None for admin (every tenant)."""
        return None if self.sees_all else self.tenant


def check_tenant(name: str) -> str:
    """A tenant name: 1-64 of lowercase letters, digits, `-`, `_` (it appears in URLs/logs)."""
    if not _TENANT.fullmatch(name):
        raise ValueError(f"tenant must match [a-z0-9][a-z0-9_-]{{0,63}}; got {name!r}")
    return name


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def parse_scopes(text: str) -> list[str]:
    scopes = sorted({s.strip() for s in text.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {text!r}")
    return scopes


def create_key(
    session: Session, *, name: str, scopes: list[str], tenant: str = DEFAULT_TENANT
) -> tuple[str, ApiKey]:
    """Create a key of `tenant`; returns (the plaintext key, shown once, and its row)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = ApiKey(
        id=key_id,
        name=name,
        salt=salt,
        key_hash=_digest(salt, secret),
        scopes=",".join(parse_scopes(",".join(scopes))),
        tenant=check_tenant(tenant),
    )
    session.add(row)
    session.flush()
    return f"ms_{key_id}_{secret}", row


def verify_key(session: Session, presented: str) -> Principal | None:
    """The principal of a valid, unrevoked key, else None."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != "ms":
        return None
    row = session.get(ApiKey, parts[1])
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, _digest(row.salt, parts[2])):
        return None
    return Principal(row.id, row.name, frozenset(row.scopes.split(",")), row.tenant)


def revoke_key(session: Session, *, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now()
    return True


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


class RateLimiter:
    """Token bucket per key: capacity `per_min`, refilled at `per_min / 60` tokens a second.

    Process-local: with several gateway replicas each enforces its own bucket.
    """

    def __init__(self, per_min: int) -> None:
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds until one is available."""
        with self._lock:
            t = time.monotonic()
            tokens, last = self._buckets.get(key, (self.capacity, t))
            tokens = min(self.capacity, tokens + (t - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, t)
                return 0.0
            self._buckets[key] = (tokens, t)
            return max(1.0, math.ceil((1.0 - tokens) / self.rate))
