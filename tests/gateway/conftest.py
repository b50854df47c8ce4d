"""Gateway fixtures: tiny images, settings, an in-process app, gateway subprocesses."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from marrowscope.paths import PROJECT_ROOT

FACTORY = "tests.gateway.fakes:make_clients"
SECRET = "test-webhook-secret"


def png(w: int = 96, h: int = 72, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def meta(**kw) -> str:
    doc = {"accession_id": "ACC-0001", "specimen_type": "bone_marrow_aspirate", "stain": "MGG"}
    doc.update(kw)
    return json.dumps(doc)


def files(*images: bytes, metadata: str | None = None) -> list:
    parts = [("images", (f"im{k}.png", data, "image/png")) for k, data in enumerate(images)]
    if metadata is not None:
        parts.append(("metadata", (None, metadata)))
    return parts


def settings_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "MS_GATEWAY_DATA_DIR": str(data_dir),
        "MS_GATEWAY_CLIENTS_FACTORY": FACTORY,
        "MS_GATEWAY_POLL_INTERVAL_S": "0.05",
        "MS_GATEWAY_HEARTBEAT_S": "0.5",
        "MS_GATEWAY_LEASE_S": "2",
        "MS_GATEWAY_MIN_CELLS": "20",
        "MS_GATEWAY_DEADLINE_S": "30",
        "MS_GATEWAY_RETRY_INITIAL_S": "0.01",
        "MS_GATEWAY_RETRY_MAX_S": "0.05",
        "MS_GATEWAY_WEBHOOK_SECRET": SECRET,
        "MS_GATEWAY_WEBHOOK_BACKOFF_S": "0.2",
        "MS_GATEWAY_WEBHOOK_BACKOFF_MAX_S": "0.5",
        "MS_GATEWAY_HL7_BACKOFF_S": "0.2",
        "MS_GATEWAY_HL7_BACKOFF_MAX_S": "0.5",
        # most tests read /metrics and /readyz detail; tests/gateway/test_http_hardening.py
        # checks them behind the ops scope
        "MS_GATEWAY_OPS_PUBLIC": "true",
    }
    env.update(extra)
    return env


@pytest.fixture
def make_settings(tmp_path):
    from services.gateway.config import GatewaySettings

    def make(**overrides):
        env = {
            k.removeprefix("MS_GATEWAY_").lower(): v
            for k, v in settings_env(tmp_path / "gw").items()
        }
        env.update(overrides)
        return GatewaySettings(**env)

    return make


@pytest.fixture
def gateway(make_settings, monkeypatch):
    """(TestClient, services, keys) of an in-process app with its embedded worker."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.auth import create_key

    def start(**overrides):
        app = create_app(make_settings(**overrides))
        services = app.state.services
        keys = {}
        with services.sessions.begin() as session:
            for name, scopes in (
                ("lis", ["submit", "read"]),
                ("reader", ["read"]),
                ("admin", ["admin"]),
            ):
                keys[name] = {"X-API-Key": create_key(session, name=name, scopes=scopes)[0]}
        return TestClient(app), services, keys

    return start


def wait_status(
    get,
    analysis_id: str,
    headers: dict,
    *,
    final: bool = True,
    timeout: float = 90.0,
    want: set[str] | None = None,
) -> dict:
    end = time.monotonic() + timeout
    body = {}
    while time.monotonic() < end:
        r = get(f"/v1/analyses/{analysis_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if want is not None and body["status"] in want:
            return body
        if want is None and final and body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"analysis {analysis_id} stuck: {body}")


class GatewayProcess:
    """`python -m services.gateway` (or `.worker`) as a real subprocess."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None,
        module: str = "services.gateway",
        log: Path | None = None,
    ) -> None:
        full = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
        if port is not None:
            full["MS_GATEWAY_PORT"] = str(port)
        self.port = port
        self.log = open(log or os.devnull, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=full,
            cwd=PROJECT_ROOT,
            stdout=self.log,
            stderr=self.log,
        )
        self.url = f"http://127.0.0.1:{port}" if port else None

    def wait_healthy(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("gateway did not become healthy")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown hooks, no lease release
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def spawn():
    procs: list[GatewayProcess] = []

    def start(env, port=None, module="services.gateway", log=None) -> GatewayProcess:
        p = GatewayProcess(env, port, module, log)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def create_key_cli(env: dict[str, str], scopes: str = "submit,read,admin") -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.gateway.keys",
            "create",
            "--name",
            "lis",
            "--scopes",
            scopes,
        ],
        env={**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()
