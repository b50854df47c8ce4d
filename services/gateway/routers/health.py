"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from services.gateway.deps import ServicesDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when the job store answers and every model service reports SERVING/ready."""

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
    return JSONResponse(
        {"ready": ready, "database": database, "models": models}, status_code=200 if ready else 503
    )


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    """Prometheus text format; labels carry no accession ids or patient data."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
