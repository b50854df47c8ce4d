"""Reviewer login through an OpenID Connect provider (the hospital's identity provider).

Authorization-code flow with PKCE (S256), `state` against login CSRF and `nonce` against ID
token replay. The flow's secrets (state, nonce, PKCE verifier) live in a short-lived
HttpOnly cookie on the browser that started it, so any gateway replica can finish it; the
token is exchanged over the back channel (client secret, HTTP Basic or POST as the provider
announces), and the ID token is checked with PyJWT: signature against the provider's JWKS
(asymmetric algorithms only, never `none` or a shared-secret HMAC), `iss`, `aud` (and `azp`
when there are several audiences), `exp`/`iat` (60 s leeway for clock skew), and `nonce`.

The claims then make the reviewer: `oidc_tenant_claim` names the tenant, `oidc_role_claim`
(a list or a space/comma separated string; a dotted path such as `realm_access.roles`
reaches into nested claims) must hold `oidc_review_role` (or `oidc_admin_role`). The
reviewer record is found by `<issuer> <sub>` and its name, tenant and roles follow the
claims at every login; a local account with the same username is never taken over.
"""

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import jwt
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.gateway.auth import check_tenant
from services.gateway.container import Services
from services.gateway.db import Reviewer
from services.gateway.review.accounts import USERNAME, LoginSession, ReviewerIdentity, identity_of

log = logging.getLogger(__name__)

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY_S = 60
DISCOVERY_TTL_S = 3600.0
HTTP_TIMEOUT_S = 10.0


class OidcError(Exception):
    """A login refused; the message tells the person why (no secrets, no tokens)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class OidcConfig(BaseModel):
    """The provider and how its claims map to reviewers (from `ReviewSettings.oidc_*`)."""

    issuer: str
    client_id: str
    client_secret: SecretStr
    scopes: str = "openid profile email"
    tenant_claim: str = "tenant"
    role_claim: str = "roles"
    review_role: str = "review"
    admin_role: str = ""
    redirect_uri: str = ""
    name: str = "single sign-on"


@dataclass(frozen=True)
class Provider:
    """What discovery says about the provider."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    basic_auth: bool


@dataclass(frozen=True)
class Pending:
    """A login in flight: what the callback must see again."""

    state: str
    nonce: str
    verifier: str

    def cookie(self) -> str:
        return f"{self.state}.{self.nonce}.{self.verifier}"

    @classmethod
    def from_cookie(cls, value: str | None) -> "Pending | None":
        parts = (value or "").split(".")
        if len(parts) != 3 or not all(parts):
            return None
        return cls(*parts)


@dataclass(frozen=True)
class OidcIdentity:
    """A person as the provider vouches for them."""

    subject: str
    display_name: str
    preferred_username: str
    tenant: str
    roles: str


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _values(value: Any) -> set[str]:
    if isinstance(value, str):
        return {v for v in re.split(r"[\s,]+", value) if v}
    if isinstance(value, list):
        return {str(v) for v in value}
    return set()


class OidcClient:
    """The gateway's side of the flow; one per app, discovery cached for an hour."""

    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._provider: Provider | None = None
        self._fetched = 0.0
        self._jwks: jwt.PyJWKClient | None = None

    def provider(self) -> Provider:
        if self._provider is not None and time.monotonic() - self._fetched < DISCOVERY_TTL_S:
            return self._provider
        issuer = self.config.issuer.rstrip("/")
        url = f"{issuer}/.well-known/openid-configuration"
        try:
            r = httpx.get(url, timeout=HTTP_TIMEOUT_S)
            r.raise_for_status()
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OidcError(f"the identity provider cannot be reached: {exc}", 503) from None
        if doc.get("issuer") != self.config.issuer:
            raise OidcError(
                f"the identity provider calls itself {doc.get('issuer')!r}, "
                f"not the configured issuer {self.config.issuer!r}",
                503,
            )
        algorithms = tuple(
            a
            for a in doc.get("id_token_signing_alg_values_supported", ["RS256"])
            if a in ASYMMETRIC
        )
        methods = doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        try:
            provider = Provider(
                issuer=doc["issuer"],
                authorization_endpoint=doc["authorization_endpoint"],
                token_endpoint=doc["token_endpoint"],
                jwks_uri=doc["jwks_uri"],
                algorithms=algorithms or ("RS256",),
                basic_auth="client_secret_basic" in methods,
            )
        except KeyError as exc:
            raise OidcError(f"the provider's discovery document lacks {exc}", 503) from None
        if self._jwks is None or provider.jwks_uri != (self._provider and self._provider.jwks_uri):
            self._jwks = jwt.PyJWKClient(provider.jwks_uri, timeout=int(HTTP_TIMEOUT_S))
        self._provider, self._fetched = provider, time.monotonic()
        return provider

    def start(self, redirect_uri: str) -> tuple[str, Pending]:
        """The provider's authorization URL to send the browser to, and what to remember."""
        provider = self.provider()
        pending = Pending(
            secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        )
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(pending.verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.config.client_id,
                "redirect_uri": redirect_uri,
                "scope": self.config.scopes,
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in provider.authorization_endpoint else "?"
        return f"{provider.authorization_endpoint}{sep}{query}", pending

    def finish(
        self, *, code: str, state: str, redirect_uri: str, pending: Pending | None
    ) -> dict[str, Any]:
        """The validated ID token's claims for the code the provider sent back."""
        if pending is None:
            raise OidcError(
                "this login was not started here or took more than 10 minutes: start again", 400
            )
        if not hmac.compare_digest(pending.state.encode(), state.encode()):
            raise OidcError("the login's state does not match: start again", 400)
        provider = self.provider()
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": pending.verifier,
            "client_id": self.config.client_id,
        }
        secret = self.config.client_secret.get_secret_value()
        auth = (self.config.client_id, secret) if provider.basic_auth else None
        if not provider.basic_auth:
            data["client_secret"] = secret
        try:
            r = httpx.post(provider.token_endpoint, data=data, auth=auth, timeout=HTTP_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise OidcError(f"the identity provider cannot be reached: {exc}", 503) from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not isinstance(body.get("id_token"), str):
            reason = body.get("error_description") or body.get("error") or f"HTTP {r.status_code}"
            raise OidcError(f"the identity provider refused the login: {reason}")
        return self.validate(body["id_token"], nonce=pending.nonce)

    def validate(self, id_token: str, *, nonce: str) -> dict[str, Any]:
        provider = self.provider()
        assert self._jwks is not None
        try:
            key = self._jwks.get_signing_key_from_jwt(id_token)
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=list(provider.algorithms),
                audience=self.config.client_id,
                issuer=provider.issuer,
                leeway=LEEWAY_S,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise OidcError("the ID token has expired: log in again") from None
        except jwt.InvalidAudienceError:
            raise OidcError("the ID token was issued for another client (audience)") from None
        except jwt.InvalidIssuerError:
            raise OidcError("the ID token comes from another issuer") from None
        except jwt.PyJWKClientError as exc:
            raise OidcError(f"the ID token's signing key is not the provider's: {exc}") from None
        except jwt.PyJWTError as exc:
            raise OidcError(f"the ID token is not valid: {exc}") from None
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.config.client_id:
            raise OidcError("the ID token names several audiences but not this client as azp")
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise OidcError("the ID token's nonce does not match this login (replayed?)")
        return claims

    def identity(self, claims: dict[str, Any]) -> OidcIdentity:
        """The reviewer the claims describe, or OidcError (403) naming the missing claim."""
        c = self.config
        roles = _values(_claim(claims, c.role_claim))
        granted = ["review"] if c.review_role in roles else []
        if c.admin_role and c.admin_role in roles:
            granted = ["admin", "review"]
        if not granted:
            raise OidcError(
                f"your account has no {c.review_role!r} role in the claim {c.role_claim!r}: "
                "ask your administrator for access to the review app",
                403,
            )
        tenant = _claim(claims, c.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise OidcError(f"your account has no tenant (claim {c.tenant_claim!r})", 403)
        try:
            tenant = check_tenant(tenant)
        except ValueError as exc:
            raise OidcError(f"the tenant claim is not usable: {exc}", 403) from None
        name = claims.get("name") or " ".join(
            str(claims[k]) for k in ("given_name", "family_name") if claims.get(k)
        )
        preferred = str(claims.get("preferred_username") or claims.get("email") or "")
        return OidcIdentity(
            subject=f"{claims['iss']} {claims['sub']}",
            display_name=str(name or preferred or claims["sub"])[:256],
            preferred_username=preferred.lower(),
            tenant=tenant,
            roles=",".join(sorted(granted)),
        )


def upsert_reviewer(session: Session, who: OidcIdentity) -> ReviewerIdentity:
    """The reviewer record of an OIDC identity: made at the first login, its name, tenant and
    roles following the provider's claims at each login. A disabled record stays disabled."""
    reviewer = session.scalar(select(Reviewer).where(Reviewer.oidc_subject == who.subject))
    if reviewer is None:
        username = who.preferred_username
        taken = session.scalar(select(Reviewer.id).where(Reviewer.username == username))
        if not USERNAME.match(username) or taken is not None:
            username = "oidc-" + hashlib.sha256(who.subject.encode()).hexdigest()[:16]
        reviewer = Reviewer(
            username=username,
            display_name=who.display_name,
            tenant=who.tenant,
            roles=who.roles,
            password_hash=None,
            oidc_subject=who.subject,
        )
        session.add(reviewer)
    elif reviewer.disabled_at is not None:
        raise OidcError("this reviewer account is disabled", 403)
    else:
        reviewer.display_name, reviewer.tenant, reviewer.roles = (
            who.display_name,
            who.tenant,
            who.roles,
        )
    session.flush()
    return identity_of(reviewer)


FLOW_COOKIE = "ms_oidc"
FLOW_TTL_S = 600


def add_routes(
    router: APIRouter,
    client: OidcClient,
    *,
    services: Services,
    render: Callable[..., HTMLResponse],
    signed_in: Callable[[Session, ReviewerIdentity, str], LoginSession],
    with_session: Callable[[Response, LoginSession], Response],
    cookie_secure: bool,
) -> None:
    """`GET /review/oidc/start` (the login page's button) and `GET /review/oidc/callback`."""

    def redirect_uri(request: Request) -> str:
        return client.config.redirect_uri or f"{request.base_url}review/oidc/callback"

    def refused(request: Request, exc: OidcError) -> Response:
        log.info("review OIDC login refused: %s", exc)
        response = render("login.html", request, status=exc.status, error=str(exc))
        response.delete_cookie(FLOW_COOKIE, path="/review/oidc")
        return response

    @router.get("/oidc/start")
    def oidc_start(request: Request) -> Response:
        try:
            url, pending = client.start(redirect_uri(request))
        except OidcError as exc:
            return refused(request, exc)
        response = RedirectResponse(url, status_code=303)
        response.headers["Cache-Control"] = "no-store"
        # Lax, not Strict: the provider's redirect back is a cross-site top-level navigation
        response.set_cookie(
            FLOW_COOKIE,
            pending.cookie(),
            max_age=FLOW_TTL_S,
            httponly=True,
            secure=cookie_secure,
            samesite="lax",
            path="/review/oidc",
        )
        return response

    @router.get("/oidc/callback")
    def oidc_callback(
        request: Request,
        code: Annotated[str, Query(max_length=4096)] = "",
        state: Annotated[str, Query(max_length=256)] = "",
        error: Annotated[str, Query(max_length=256)] = "",
        error_description: Annotated[str, Query(max_length=1024)] = "",
    ) -> Response:
        try:
            if error:
                raise OidcError(
                    f"the identity provider refused the login: {error_description or error}"
                )
            if not code or not state:
                raise OidcError("the identity provider sent no code: start again", 400)
            claims = client.finish(
                code=code,
                state=state,
                redirect_uri=redirect_uri(request),
                pending=Pending.from_cookie(request.cookies.get(FLOW_COOKIE)),
            )
            person = client.identity(claims)
            with services.sessions() as session, session.begin():
                who = upsert_reviewer(session, person)
                opened = signed_in(session, who, "oidc")
        except OidcError as exc:
            return refused(request, exc)
        # A page, not a redirect: the session cookie is SameSite=Strict, and browsers leave it
        # out of every request of a navigation chain that began on the provider's site.
        response = render("signed_in.html", request)
        response.delete_cookie(FLOW_COOKIE, path="/review/oidc")
        return with_session(response, opened)
