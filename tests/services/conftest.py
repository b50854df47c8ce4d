"""Fixtures of the service tests: the session's real MLflow server and model services
started as real processes, once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tritonclient.grpc as tc

from tests import fixtures_mlflow
from tests.services.helpers import ServiceProcess, register

mlflow_server = fixtures_mlflow.mlflow_server  # session fixture, re-exported


@pytest.fixture(scope="module")
def start_service(mlflow_server, tmp_path_factory) -> Iterator:
    """``start_service(name, **settings) -> ServiceProcess`` (SERVING); stopped (SIGTERM)
    at the end of the module, which must exit 0."""
    started: list[ServiceProcess] = []
    cache = tmp_path_factory.mktemp("service-cache")

    def start(name: str, **settings: object) -> ServiceProcess:
        service = ServiceProcess(name, mlflow_server, cache, **settings)
        started.append(service)
        return service.wait_serving()

    yield start
    codes = {s.name: s.stop() for s in started}
    assert all(code == 0 for code in codes.values()), (codes, [s.log_tail() for s in started])


@pytest.fixture(scope="module")
def serve_registered(mlflow_server, start_service):
    """``serve_registered(kind, model_dir, alias, lineage=None, **settings)``: register the
    model, point ``alias`` at it and start its service on that alias; the returned
    ServiceProcess has ``.version``."""

    def serve(
        kind: str, model_dir, alias: str, lineage: dict[str, str] | None = None, **settings: object
    ) -> ServiceProcess:
        version = register(mlflow_server, kind, model_dir, alias, lineage)
        service = start_service(kind, model_uri=f"models:/marrowscope-{kind}@{alias}", **settings)
        service.version = version
        return service

    return serve


@pytest.fixture(scope="module")
def client(service):
    """An unmodified tritonclient.grpc client of the module's ``service`` fixture."""
    c = tc.InferenceServerClient(url=service.address)
    yield c
    c.close()
