"""SIGTERM while a slow request runs: it completes, health drains, the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.runtime.test_server import _input

REPO = Path(__file__).resolve().parents[2]


def _wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service="toy"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.1)
    raise AssertionError("toy service did not become SERVING")


def test_sigterm_finishes_in_flight_request_and_exits_zero(tmp_path, port_factory):
    version_file = tmp_path / "version"
    version_file.write_text("2\n")
    port = port_factory()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOY_VERSION_FILE": str(version_file),
        "MS_TOY_GRPC_HOST": "127.0.0.1",
        "MS_TOY_GRPC_PORT": str(port),
        "MS_TOY_METRICS_HOST": "127.0.0.1",
        "MS_TOY_METRICS_PORT": str(port_factory()),
        "MS_TOY_POLL_INTERVAL_S": "0",
        "MS_TOY_GRACE_PERIOD_S": "10",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.toy_service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, proc)
        result: dict = {}

        def slow() -> None:
            client = tc.InferenceServerClient(url=address)
            try:
                x = np.full((1, 1), 5, np.float32)
                out = client.infer("toy", [_input("X", x, "FP32")], parameters={"delay_ms": 1500})
                result["y"] = float(out.as_numpy("Y")[0, 0])
                result["version"] = out.get_response().model_version
            except BaseException as exc:
                result["error"] = exc
            finally:
                client.close()

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)  # the request is now sleeping inside predict
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        thread.join(15)
        code = proc.wait(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert "error" not in result, (result, stderr[-2000:])
    assert result == {"y": 10.0, "version": "2"}
    assert code == 0, stderr[-2000:]
    assert elapsed < 10, "shutdown waited for the whole grace period instead of the request"
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert "signal received, draining" in messages and messages[-1] == "stopped"
