"""The application's service container: `Services`, built once per API or worker process.

It imports only the building blocks (settings, job store, blobs, metrics, model clients),
never `app`, `worker` or a router, so every one of them can import it (FastAPI template:
`deps` imports only `core`); `deps` exposes it to the routes.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from services.gateway.auth import RateLimiter
from services.gateway.blobs import BlobStore
from services.gateway.clients import ModelClients
from services.gateway.config import GatewaySettings
from services.gateway.db import make_engine, make_sessionmaker
from services.gateway.doorbell import Doorbell
from services.gateway.guard import AuthFailureLimiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.migrations import upgrade_head
from services.gateway.oip import OipModelClients
from services.gateway.pdfsign import ReportSigner, signer_from
from services.gateway.review.outcomes import AgreementCache, Tally
from services.gateway.store import status_counts


@dataclass
class Services:
    """Everything the routes and workers share; built once per app / worker process."""

    settings: GatewaySettings
    engine: Engine
    sessions: sessionmaker
    blobs: BlobStore
    metrics: GatewayMetrics
    limiter: RateLimiter
    auth_failures: AuthFailureLimiter | None = None
    clients: ModelClients | None = None
    doorbell: Doorbell = field(default_factory=Doorbell)
    pdf_signer: ReportSigner | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    def make_clients(self) -> ModelClients:
        self.clients = load_clients(self.settings)
        return self.clients


def build_services(settings: GatewaySettings) -> Services:
    """Create the folders, run the migrations and build the shared objects."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.image_root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade_head(engine)
    sessions = make_sessionmaker(engine)
    metrics = GatewayMetrics()

    def counts() -> dict[str, int]:
        with sessions() as session:
            return status_counts(session)

    metrics.watch_jobs(counts)
    agreement = AgreementCache()

    def review_totals() -> Tally:
        with sessions() as session:
            return agreement.totals(session)

    metrics.watch_reviews(review_totals)
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        blobs=BlobStore(settings.image_root),
        metrics=metrics,
        limiter=RateLimiter(settings.rate_limit_per_min),
        auth_failures=AuthFailureLimiter(settings.auth_failures_per_min),
        pdf_signer=signer_from(settings),  # a bad key stops startup here, with the reason
    )


def load_clients(settings: GatewaySettings) -> ModelClients:
    """The configured implementation: the plugin factory when set, else OIP over gRPC."""
    if settings.clients_factory:
        module_name, _, func_name = settings.clients_factory.partition(":")
        if not func_name:
            raise ValueError("MS_GATEWAY_CLIENTS_FACTORY must read module:function")
        factory = getattr(importlib.import_module(module_name), func_name)
        clients = factory(settings)
    else:
        clients = OipModelClients.from_settings(settings)
    if not isinstance(clients, ModelClients):
        raise TypeError(f"{settings.clients_factory} did not return a ModelClients")
    return clients
