"""`python -m services.<name> --help` as real processes: usage with every setting and its
environment variable, exit 0, nothing loaded or bound; unknown arguments exit 2."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("segmentation", "celltype", "ensemble", "npm1", "explain")


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    # a model URI that would fail loudly if anything tried to resolve or load it
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        f"MS_{name.upper()}_MODEL_URI": "models:/does-not-exist@nowhere",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
    }
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", SERVICES)
def test_help_lists_every_setting_and_exits_zero(name):
    config = importlib.import_module(f"services.{name}.config")
    (settings_cls,) = [
        c for c in vars(config).values() if isinstance(c, type) and c.__module__ == config.__name__
    ]
    result = _run(name, "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"usage: python -m services.{name}")
    for field in settings_cls.model_fields:
        assert f"MS_{name.upper()}_{field.upper()}" in out, field
    assert "MS_" + name.upper() + "_GRACE_PERIOD_S  float  (default: 10.0)" in out
    # nothing started: no JSON log line (listening, loading) was written
    assert "listening" not in result.stderr and "loading" not in result.stderr


def test_short_help_and_unknown_arguments():
    assert _run("npm1", "-h").returncode == 0
    bad = _run("npm1", "--port", "1")
    assert bad.returncode == 2
    assert "unrecognized arguments: --port 1" in bad.stderr and "usage:" in bad.stderr
