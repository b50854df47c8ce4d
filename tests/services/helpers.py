"""Helpers for the service tests: a model service as a real process (`python -m
services.<name>`) on loopback ports, registry set-up, metrics and status checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = float(os.environ.get("MARROWSCOPE_TEST_SERVICE_START_S", "120"))


def register(
    tracking_uri: str, kind: str, model_dir: Path, alias: str, lineage: dict[str, str] | None = None
) -> str:
    """Register ``model_dir`` as a new version of ``marrowscope-<kind>`` and point
    ``alias`` at it; returns the version."""
    from marrowscope.registry import register_model_dir

    version = register_model_dir(
        kind,
        model_dir,
        metrics={},
        params={},
        data_hash="test",
        lineage=lineage or {},
        tracking_uri=tracking_uri,
    )
    set_alias(tracking_uri, kind, alias, version)
    return version


def set_alias(tracking_uri: str, kind: str, alias: str, version: str) -> None:
    from marrowscope.registry import get_client, registered_name

    get_client(tracking_uri).set_registered_model_alias(registered_name(kind), alias, version)


class ServiceProcess:
    """One model service subprocess; its log goes to ``log_path``."""

    def __init__(self, name: str, tracking_uri: str, cache_dir: Path, **settings: object) -> None:
        self.name = name
        self.grpc_port, self.metrics_port = free_port(), free_port()
        prefix = f"MS_{name.upper()}_"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MARROWSCOPE_MODEL_CACHE": str(cache_dir),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        values = {
            "grpc_host": "127.0.0.1",
            "grpc_port": self.grpc_port,
            "metrics_host": "127.0.0.1",
            "metrics_port": self.metrics_port,
            "poll_interval_s": 0,
            "grace_period_s": 5,
            **settings,
        }
        env.update({f"{prefix}{k.upper()}": str(v) for k, v in values.items()})
        self.log_path = cache_dir / f"{name}-{self.grpc_port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
            return reply.status

    def wait_serving(self) -> ServiceProcess:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                # the whole server (""): its own model and every extra model of the process
                # (the ensemble process's `mil` loads after the ensemble)
                if self.health("") == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass  # not listening or not loaded yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not SERVING after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def metric(url: str, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def infer_input(name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as tc

    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def status_of(exc: BaseException) -> str:
    """``INVALID_ARGUMENT`` etc. from a tritonclient InferenceServerException."""
    return str(exc.status()).removeprefix("StatusCode.")


def check_server_and_metadata(
    client, name: str, version: str, inputs: dict[str, tuple[str, list[int]]]
) -> None:
    """Server live/ready, model ready, metadata lists ``version`` first and ``inputs``
    ({name: (datatype, shape)}) exactly."""
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, version)
    md = client.get_model_metadata(name)
    assert md.name == name and md.versions[0] == version
    assert {t.name: (t.datatype, list(t.shape)) for t in md.inputs} == inputs


def check_still_healthy(service: ServiceProcess) -> None:
    assert service.proc.poll() is None, service.log_tail()
    assert service.health() == health_pb2.HealthCheckResponse.SERVING
