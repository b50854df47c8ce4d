"""A real `mlflow server` process on a free loopback port, shared by the whole session.

Use from any test module (pytest forbids `pytest_plugins` outside the root conftest):

    from tests import fixtures_mlflow

    mlflow_server = fixtures_mlflow.mlflow_server  # re-export the fixture into the module

    def test_x(mlflow_server):  # -> tracking URI "http://127.0.0.1:<port>"
        ...

However many modules import the fixture, one server starts per test session (start-up
takes ~20 s on a loaded 2-core machine) and is terminated when the session ends.
Backend: SQLite in a temp dir; artifacts proxied by the server (`--serve-artifacts`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

START_TIMEOUT_S = float(os.environ.get("MARROWSCOPE_TEST_MLFLOW_START_S", "180"))


class MlflowServer:
    """One `mlflow server` subprocess in its own process group."""

    _shared: MlflowServer | None = None

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="marrowscope-mlflow-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(self.root / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.root,
            )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    def shared(cls, config: pytest.Config) -> MlflowServer:
        if cls._shared is None or cls._shared.proc.poll() is not None:
            server = cls()
            server.wait_healthy()
            cls._shared = server

            def _cleanup() -> None:
                server.stop()
                cls._shared = None

            config.add_cleanup(_cleanup)
        return cls._shared


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest) -> str:
    """Tracking URI (`http://127.0.0.1:<port>`) of the session's real MLflow server."""
    return MlflowServer.shared(request.config).uri


def make_tiny_model_dir(kind: str, directory: Path, *, seed: int = 0, **fields) -> Path:
    """Save a tiny CPU model of registry `kind` (segmentation|celltype|ensemble|npm1|nucseg|mil).

    Ensemble feature names default to `marrowscope.features.case_feature_names()` so that
    promotion's config gate passes; celltype outputs default to the full taxonomy.
    """
    import torch

    from marrowscope.models import build_model, make_config, save_model

    torch.manual_seed(seed)
    if kind == "segmentation":
        fields = {"classes": ["BLA", "LYT", "RBC"], "min_size": 64, "max_size": 96, **fields}
        config = make_config("detector", "fasterrcnn_mobilenet_v3_large_fpn", **fields)
    elif kind == "celltype":
        config = make_config("celltype", "tiny_cnn", **{"crop_size": 32, **fields})
    elif kind == "ensemble":
        from marrowscope.features import case_feature_names

        fields = {
            "feature_names": list(case_feature_names()),
            "hidden": [4],
            "dropout": 0.0,
            **fields,
        }
        config = make_config("ensemble", "mlp", **fields)
    elif kind == "npm1":
        config = make_config("npm1", "resnet18", **{"input_size": [64, 64], **fields})
    elif kind == "nucseg":
        fields = {"input_size": [32, 32], "base_channels": 4, "depth": 2, **fields}
        config = make_config("nucseg", "unet", **fields)
    elif kind == "mil":
        fields = {
            "embedding_dim": 64,  # the tiny_cnn celltype's
            "hidden": 8,
            "attention": 4,
            "celltype": {"name": "marrowscope-celltype", "version": "1"},
            **fields,
        }
        config = make_config("mil", "gated_attention", **fields)
    else:
        raise ValueError(kind)
    return save_model(build_model(config), config, directory)
