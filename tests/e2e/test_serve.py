"""`make serve` (`python -m training.serve`): the whole stack from a registry until Ctrl-C.

Real processes throughout: a real MLflow server holding tiny models under an alias, the
command as a subprocess, its printed key used over real HTTP, an order sent to its printed
MLLP address, SIGINT, and every process it started gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from marrowscope.paths import PROJECT_ROOT
from tests import fixtures_mlflow
from tests.conftest import free_port
from tests.hl7.conftest import Client, inputs, msa, order
from tests.services.helpers import register

mlflow_server = fixtures_mlflow.mlflow_server
ALIAS = "serve"
START_DEADLINE_S = 400.0


def _serve(workdir: Path, tracking_uri: str, port: int, hl7_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.serve",
            "--workdir",
            str(workdir),
            "--tracking-uri",
            tracking_uri,
            "--alias",
            ALIAS,
            "--port",
            str(port),
            "--hl7-port",
            str(hl7_port),
        ],
        cwd=PROJECT_ROOT,
        env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_refuses_a_registry_without_the_models(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.serve", "--workdir", str(tmp_path)],
        cwd=PROJECT_ROOT,
        env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "make demo" in result.stdout
    assert not (tmp_path / "stack").exists(), "started something without models"


def test_serve_runs_the_stack_until_ctrl_c(mlflow_server: str, tmp_path: Path) -> None:
    root = tmp_path
    versions = {}
    for kind in ("segmentation", "celltype", "npm1"):
        model_dir = fixtures_mlflow.make_tiny_model_dir(kind, root / kind)
        versions[kind] = register(mlflow_server, kind, model_dir, ALIAS)
    ensemble_dir = fixtures_mlflow.make_tiny_model_dir("ensemble", root / "ensemble")
    register(
        mlflow_server,
        "ensemble",
        ensemble_dir,
        ALIAS,
        {"segmentation": versions["segmentation"], "celltype": versions["celltype"]},
    )
    workdir = root / "demo"
    workdir.mkdir()
    # the demo's settings file: serve must start the stack with exactly this environment
    (workdir / "stack.json").write_text(
        json.dumps(
            {
                "tracking_uri": "ignored-when-the-flag-is-given",
                "env": {"MS_GATEWAY_MIN_CELLS": "3", "MS_GATEWAY_REVIEW_COOKIE_SECURE": "false"},
            }
        )
    )
    port, hl7_port = free_port(), free_port()
    proc = _serve(workdir, mlflow_server, port, hl7_port)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "ready; Ctrl-C" in line:
                break
        output = "\n".join(lines)
        assert lines and "ready; Ctrl-C" in lines[-1], output
        key = next(x.split()[3] for x in lines if x.startswith("LIS API key"))
        pids = [int(p) for p in next(x for x in lines if x.startswith("pids")).split()[1:]]
        assert len(pids) == 7, output  # five model services, the gateway, the HL7 listener
        assert f"http://127.0.0.1:{port}" in output
        response = httpx.get(
            f"http://127.0.0.1:{port}/v1/analyses", headers={"X-API-Key": key}, timeout=30
        )
        assert response.status_code == 200, response.text
        review = next(x for x in lines if x.startswith("review app"))
        password = review.rsplit(" / ", 1)[1].rstrip(")")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as browser:
            login = browser.post(
                "/review/login", data={"username": "demo.reviewer", "password": password}
            )
            assert login.status_code == 303, "the printed reviewer login does not work"
        # an order to the printed MLLP address, its images where the printed line says
        hl7 = next(x for x in lines if x.startswith("hl7 (MLLP)"))
        assert hl7.split()[2] == f"127.0.0.1:{hl7_port}", hl7
        input_root = Path(hl7.split(" in ", 1)[1].removesuffix("/<accession>/"))
        assert input_root == workdir / "hl7-inputs"
        inputs(input_root, "ACC-SERVE")
        mllp = Client(hl7_port)
        try:
            answer = msa(mllp.send(order("PO-SERVE", "ACC-SERVE")))
        finally:
            mllp.close()
        assert answer[1] == "AA" and answer[3].startswith("analysis "), answer
        listed = httpx.get(
            f"http://127.0.0.1:{port}/v1/analyses", headers={"X-API-Key": key}, timeout=30
        ).json()
        assert answer[3].split()[1] in json.dumps(listed), "the order's analysis is not listed"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output + rest
        assert "every process stopped" in rest
        assert not [p for p in pids if _alive(p)], "a process outlived Ctrl-C"
        assert (workdir / "stack" / "gateway.log").is_file()
        assert (workdir / "stack" / "hl7.log").is_file()
    finally:
        if proc.poll() is None:  # a failed assertion: stop it the way a person would
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
