"""Fixtures of the service tests: the session's real MLflow server and model services
started as real processes, once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import fixtures_mlflow
from tests.services.helpers import ServiceProcess

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


