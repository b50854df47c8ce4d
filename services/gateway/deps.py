"""FastAPI dependencies and their `Annotated` aliases, and the caller-scoped access every
router shares (`get_analysis`, `audit`, the Idempotency-Key replay of the submit routes).

Routers import this module, the store, schemas and errors; never `app`, `worker` or another
router (tests/gateway/test_import_graph.py), so the request path has no import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Response, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.gateway import store
from services.gateway.auth import Principal, verify_key
from services.gateway.config import GatewaySettings
from services.gateway.container import Services
from services.gateway.db import Analysis
from services.gateway.errors import RATE, ApiError
from services.gateway.intake import Submitter
from services.gateway.schemas import AnalysisAccepted


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> GatewaySettings:
    return services.settings


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def require(scope: str):
    """Dependency: the caller's `Principal` when its key is valid and has `scope`."""

    def dependency(
        services: ServicesDep,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header: Annotated[str | None, Depends(_header)],
    ) -> Principal:
        given = {c for c in (header, bearer.credentials if bearer else None) if c}
        if len(given) > 1:  # never let a valid key mask an invalid one sent alongside it
            raise ApiError(
                401,
                "unauthenticated",
                "send one API key: Authorization: Bearer or X-API-Key, not two different ones",
                {"WWW-Authenticate": "Bearer"},
            )
        presented = given.pop() if given else None
        if not presented:
            raise ApiError(
                401, "unauthenticated", "an API key is required", {"WWW-Authenticate": "Bearer"}
            )
        with services.sessions() as session:
            principal = verify_key(session, presented)
        if principal is None:
            raise ApiError(
                401, "unauthenticated", "invalid or revoked API key", {"WWW-Authenticate": "Bearer"}
            )
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise ApiError(403, "forbidden", f"this key lacks the {scope!r} scope")
        wait = services.limiter.acquire(principal.key_id)
        if wait:
            raise RATE.error("rate limit exceeded for this key", {"Retry-After": str(int(wait))})
        return principal

    return dependency


SubmitKey = Annotated[Principal, Depends(require("submit"))]
ReadKey = Annotated[Principal, Depends(require("read"))]
AdminKey = Annotated[Principal, Depends(require("admin"))]
_require_ops = require("ops")


def ops_key(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal | None:
    """A key with the `ops` scope (401/403 otherwise); None with `MS_GATEWAY_OPS_PUBLIC`."""
    if services.settings.ops_public:
        return None
    return _require_ops(services, bearer, header)


OpsKey = Annotated[Principal | None, Depends(ops_key)]


def may_see_ops(services: ServicesDep, request: Request) -> bool:
    """Whether the request carries a valid key with the `ops` (or `admin`) scope (or
    `MS_GATEWAY_OPS_PUBLIC`); no key or another key is not an error here: the route answers
    with less detail. (Read from the headers, not the security schemes: the route must not
    be documented as requiring a key, probes call it without one.)"""
    from services.gateway.guard import presented_key

    if services.settings.ops_public:
        return True
    presented, _ = presented_key(request.headers)
    if not presented:
        return False
    with services.sessions() as session:
        principal = verify_key(session, presented)
    return principal is not None and bool({"ops", "admin"} & principal.scopes)


OpsDetail = Annotated[bool, Depends(may_see_ops)]


def get_analysis(session: Session, analysis_id: str, principal: Principal) -> Analysis:
    """The analysis if the caller's tenant may see it; else 404 (never 403: no existence
    leak across tenants)."""
    a = store.get_analysis(session, analysis_id=analysis_id, tenant=principal.visible_tenant)
    if a is None:
        raise ApiError(404, "not_found", f"no analysis {analysis_id}")
    return a


def audit(
    session: Session,
    principal: Principal,
    action: str,
    *,
    resource: str | None = None,
    detail: str | None = None,
) -> None:
    """Record who (key and tenant) did `action` on `resource`."""
    store.audit(
        session,
        key_id=principal.key_id,
        key_name=principal.name,
        tenant=principal.tenant,
        action=action,
        resource=resource,
        detail=detail,
    )


def submitter(principal: Principal) -> Submitter:
    """The caller as `intake.submit` records it: its tenant and key."""
    return Submitter(tenant=principal.tenant, key_id=principal.key_id, key_name=principal.name)


def replay(
    services: Services, principal: Principal, response: Response, analysis_id: str
) -> AnalysisAccepted:
    """An idempotent replay: 200 with the existing analysis and `Idempotent-Replayed`."""
    response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/analyses/{analysis_id}"
    response.headers["Idempotent-Replayed"] = "true"
    with services.sessions() as session:
        a = get_analysis(session, analysis_id, principal)
        return AnalysisAccepted(id=a.id, status=a.status, location=f"/v1/analyses/{a.id}")
