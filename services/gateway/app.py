"""App factory: `create_app(settings)` builds the service container (`container.Services`)
once and wires it, the routers and (when `EMBEDDED_WORKER`) a worker loop into one FastAPI
app. Only `__main__` imports this module: the routers and the worker reach the shared
objects through the container, never through the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.auth import verify_key
from services.gateway.config import GatewaySettings
from services.gateway.container import build_services
from services.gateway.errors import SLIDE_BYTES, ApiError, CodedHTTPError, http_error_code
from services.gateway.guard import RequestGuard, route_templates
from services.gateway.review import router as review
from services.gateway.routers import analyses, health, reports, slides
from services.gateway.worker import Worker

log = logging.getLogger(__name__)

API_DESCRIPTION = """The MarrowScope gateway: submit bone-marrow smear images of a case, poll or
receive a signed webhook, and fetch JSON / FHIR R4B reports and explanation images.

Authentication: `Authorization: Bearer <key>` or `X-API-Key: <key>`; scopes `submit`,
`read`, `ops` (metrics, readiness detail), `admin`. 401 = missing or invalid key, 403 = the
key lacks the scope, 429 = the key's rate limit (see `Retry-After`). Each key belongs to one tenant and sees only that
tenant's analyses (another tenant's id answers 404); `admin` keys see every tenant.
Errors are JSON `{"error": code, "detail": text}`.
AI-generated decision support; not a diagnosis."""


DOCS_ASSETS = "/docs/assets"


def _local_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its JS/CSS served by the gateway (the `swagger-ui-bundle`
    package): FastAPI's default loads them from a CDN, which a hospital network without
    internet access cannot reach, and the page stays blank."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def serve_metrics(port: int, registry):
    """Prometheus metrics on their own port for the scraper (None when `port` is 0): the
    API port's `/metrics` needs an `ops` key."""
    if not port:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, registry=registry)
    log.info("metrics on port %d", port)
    return server


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    services = build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = services.make_clients()
        stop = asyncio.Event()
        if settings.embedded_worker:
            services.doorbell.bind()
            worker = Worker(
                settings=settings,
                sessions=services.sessions,
                blobs=services.blobs,
                clients=clients,
                metrics=services.metrics,
                doorbell=services.doorbell,
                pdf_signer=services.pdf_signer,
            )
            services.tasks.append(asyncio.create_task(worker.run(stop)))
        metrics_server = serve_metrics(settings.metrics_port, services.metrics.registry)
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            stop.set()
            for task in services.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await clients.close()
            services.engine.dispose()

    app = FastAPI(
        title="MarrowScope gateway",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local assets
        redoc_url=None,  # ReDoc exists only as a CDN script: the same OpenAPI is at /docs
        # the parser's default of 1,000 files refused single-cell cases the settings allow;
        # one file more than allowed reaches the route, whose 413 too_many_images says why
        form_limits={"max_files": max(settings.max_images, settings.max_cell_images) + 1},
    )
    app.state.services = services
    _local_docs(app)

    def key_is_valid(key: str) -> bool:
        with services.sessions() as session:
            return verify_key(session, key) is not None

    app.add_middleware(
        RequestGuard,
        max_request_bytes=settings.max_request_bytes,
        # a slide upload is one streamed file, bounded by the slide limit instead
        body_limits={"/v1/slide-uploads": (settings.max_slide_bytes, SLIDE_BYTES)},
        body_idle_timeout_s=settings.body_idle_timeout_s,
        key_is_valid=key_is_valid,
        auth_failures=services.auth_failures,
        metrics=services.metrics,
        templates=lambda: route_templates(app),
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes, wrong methods, unparsable bodies: the same shape as every error
        code = exc.code if isinstance(exc, CodedHTTPError) else http_error_code(exc.status_code)
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code, "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            "{}: {}".format(".".join(str(p) for p in e.get("loc", ())), e.get("msg"))
            for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid_request", "detail": "; ".join(parts)}, status_code=422
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The LIS always gets JSON; details stay in our log under an id it can quote.
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error %s", error_id, exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": f"internal error, quote id {error_id}"},
            status_code=500,
        )

    app.include_router(health.router)
    app.include_router(analyses.router)
    app.include_router(reports.router)
    app.include_router(slides.router)
    review.mount(app, services)
    return app
