"""Reviewer accounts, login sessions, CSRF tokens and login throttling for the review app.

Reviewers are people, not the LIS: they log in with a username and password (argon2id
hashes, `argon2-cffi`'s defaults, re-hashed when the parameters change) and hold a
server-side session. The cookie carries a random token; the database keeps only its
SHA-256, the reviewer, a per-session CSRF token and the expiry. Every state-changing form
sends the CSRF token back (synchroniser-token pattern), compared in constant time.

Failed logins are throttled per username and per client address separately, so a
stranger guessing one account's password cannot lock every other account out, and one
address cannot try many accounts. The counts live in the process (each gateway replica
throttles on its own: with N replicas an attacker gets N times the budget, still bounded).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.gateway.auth import check_tenant
from services.gateway.db import Reviewer, ReviewSession, now

ROLES = ("review", "admin")
"""`review`: see, correct and sign out the tenant's cases; `admin`: also every tenant's."""
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,63}$")
MIN_PASSWORD_LENGTH = 12
_hasher = PasswordHasher()
# Verified against when the username is unknown, so both paths cost one argon2 verification
# and the response time does not tell which usernames exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A bad username, password, role or tenant; the message says which and why."""


@dataclass(frozen=True)
class ReviewerIdentity:
    """Who is logged in: what the routes need to scope and attribute every action."""

    id: str
    username: str
    display_name: str
    tenant: str
    roles: tuple[str, ...]

    @property
    def visible_tenant(self) -> str | None:
        """The tenant whose cases this reviewer sees; None (all) for admins."""
        return None if "admin" in self.roles else self.tenant


def identity_of(r: Reviewer) -> ReviewerIdentity:
    return ReviewerIdentity(
        id=r.id,
        username=r.username,
        display_name=r.display_name,
        tenant=r.tenant,
        roles=tuple(x for x in r.roles.split(",") if x),
    )


def check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise AccountError(
            f"username {username!r} must be 2-64 characters of a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


def parse_roles(text: str) -> str:
    roles = sorted({r.strip() for r in text.split(",") if r.strip()})
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise AccountError(f"roles must be among {', '.join(ROLES)}; got {text!r}")
    return ",".join(roles)


def add_reviewer(
    session: Session,
    *,
    username: str,
    password: str,
    display_name: str = "",
    tenant: str = "default",
    roles: str = "review",
) -> Reviewer:
    """A new local reviewer account (AccountError when the name is taken or input is bad)."""
    check_username(username)
    check_password(password)
    tenant = check_tenant(tenant)
    role_text = parse_roles(roles)
    if session.scalar(select(Reviewer).where(Reviewer.username == username)) is not None:
        raise AccountError(f"reviewer {username!r} exists already")
    reviewer = Reviewer(
        username=username,
        display_name=display_name or username,
        tenant=tenant,
        roles=role_text,
        password_hash=_hasher.hash(password),
    )
    session.add(reviewer)
    session.flush()
    return reviewer


def set_password(session: Session, *, username: str, password: str) -> None:
    reviewer = session.scalar(select(Reviewer).where(Reviewer.username == username))
    if reviewer is None:
        raise AccountError(f"no reviewer {username!r}")
    if reviewer.oidc_subject is not None:
        raise AccountError(f"{username!r} logs in through OIDC: its password is the provider's")
    reviewer.password_hash = _hasher.hash(check_password(password))
    # a new password ends every session of the old one
    session.execute(delete(ReviewSession).where(ReviewSession.reviewer_id == reviewer.id))


def disable_reviewer(session: Session, *, username: str) -> bool:
    reviewer = session.scalar(select(Reviewer).where(Reviewer.username == username))
    if reviewer is None or reviewer.disabled_at is not None:
        return False
    reviewer.disabled_at = now()
    session.execute(delete(ReviewSession).where(ReviewSession.reviewer_id == reviewer.id))
    return True


def list_reviewers(session: Session) -> list[Reviewer]:
    return list(session.scalars(select(Reviewer).order_by(Reviewer.username)))


def authenticate(session: Session, *, username: str, password: str) -> ReviewerIdentity | None:
    """The reviewer when the password matches an active local account, else None."""
    reviewer = session.scalar(select(Reviewer).where(Reviewer.username == username))
    stored = reviewer.password_hash if reviewer is not None else None
    try:
        _hasher.verify(stored or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if reviewer is None or stored is None or reviewer.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(stored):
        reviewer.password_hash = _hasher.hash(password)
    return identity_of(reviewer)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class LoginSession:
    token: str
    """The cookie's value: shown once, stored only hashed."""
    csrf_token: str
    expires_at: float


def open_session(session: Session, *, reviewer_id: str, ttl_s: float) -> LoginSession:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    expires = now() + ttl_s
    session.add(
        ReviewSession(
            token_hash=_token_hash(token),
            reviewer_id=reviewer_id,
            csrf_token=csrf,
            expires_at=expires,
        )
    )
    # expired sessions go when anyone logs in: the table never grows without bound
    session.execute(delete(ReviewSession).where(ReviewSession.expires_at < now()))
    return LoginSession(token=token, csrf_token=csrf, expires_at=expires)


@dataclass(frozen=True)
class ActiveSession:
    reviewer: ReviewerIdentity
    csrf_token: str
    token_hash: str


def resolve_session(session: Session, token: str | None) -> ActiveSession | None:
    """The logged-in reviewer of a cookie token, or None (absent, unknown, expired, disabled)."""
    if not token:
        return None
    row = session.get(ReviewSession, _token_hash(token))
    if row is None or row.expires_at < now():
        return None
    reviewer = session.get(Reviewer, row.reviewer_id)
    if reviewer is None or reviewer.disabled_at is not None:
        return None
    return ActiveSession(identity_of(reviewer), row.csrf_token, row.token_hash)


def close_session(session: Session, token_hash: str) -> None:
    session.execute(delete(ReviewSession).where(ReviewSession.token_hash == token_hash))


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


class LoginThrottle:
    """At most `limit` failed logins per username and per address in `window_s` seconds.

    Only failures count, and a username's budget is separate from an address's: an
    attacker behind the hospital's NAT address can exhaust that address's budget, which
    then refuses logins from it for at most `window_s`, but never another address's."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, t: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= t - self.window_s:
            q.popleft()
        return q

    def wait_s(self, *, username: str, address: str) -> float:
        """Seconds until another try is allowed (0: go ahead)."""
        t = time.monotonic()
        with self._lock:
            waits = [
                q[0] + self.window_s - t
                for key in (f"user:{username}", f"addr:{address}")
                if len(q := self._recent(key, t)) >= self.limit
            ]
        return max(waits, default=0.0)

    def failed(self, *, username: str, address: str) -> None:
        t = time.monotonic()
        with self._lock:
            for key in (f"user:{username}", f"addr:{address}"):
                self._recent(key, t).append(t)
