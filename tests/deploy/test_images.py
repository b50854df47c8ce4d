"""Static checks of docker/Dockerfile (it cannot be built here): non-root, pinned bases,
CPU/CUDA variants, the Makefile's install steps."""

from __future__ import annotations

import re

from tests.deploy.conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def stages() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in DOCKERFILE.splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def test_final_targets_run_as_non_root():
    st = stages()
    for target in ("services", "training"):
        users = [ln.split()[1] for ln in st[target] if ln.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), target


def test_variants_and_pinned_bases():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M))
    assert args["VARIANT"] == "cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert "FROM base-${VARIANT} AS base" in DOCKERFILE
    assert "python3.11" in "".join(stages()["base-cuda"])
    assert ":latest" not in DOCKERFILE


def test_install_steps_match_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    for step in (
        "-r requirements.in -c constraints.txt",
        "--no-deps -e .",
        "-m services.runtime.codegen",
    ):
        assert step in makefile and step in DOCKERFILE, step


def test_dockerignore_keeps_secrets_and_bulk_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "mlruns/", "tests/", "**/*.safetensors"):
        assert entry in ignored, entry
