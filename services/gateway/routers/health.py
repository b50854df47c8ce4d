"""Liveness, readiness and Prometheus metrics.

`/healthz` and a bare `/readyz` (`{"ready": bool}`) are public, for probes; the per-model
detail of `/readyz` and `/metrics` tell an outsider which services are down and how busy the
gateway is, so they need a key with the `ops` scope (the scraper reads the separate
`MS_GATEWAY_METRICS_PORT` instead)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from services.gateway.deps import OpsDetail, OpsKey, ServicesDep
from services.gateway.errors import error_responses

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready"}})
async def readyz(services: ServicesDep, detail: OpsDetail) -> JSONResponse:
    """Ready when the job store answers and every model service reports SERVING/ready; the
    job store's and each model's state only for a key with the `ops` scope."""

    def db_ok() -> bool:
        try:
            with services.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # any driver error means "not ready"; logged
            log.warning("job store not reachable: %s", exc)
            return False

    database = await asyncio.to_thread(db_ok)
    models: dict[str, bool] = {}
    if services.clients is not None:
        models = await services.clients.ready(timeout=services.settings.ready_timeout_s)
    ready = database and bool(models) and all(models.values())
    body: dict = {"ready": ready}
    if detail:
        body |= {"database": database, "models": models}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses=error_responses(401, 403, 429),
)
def metrics(services: ServicesDep, _ops: OpsKey) -> Response:
    """Prometheus text format (key with the `ops` scope); labels carry no accession ids or
    patient data. Without a key: `MS_GATEWAY_METRICS_PORT`."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
