"""Rendering helpers for the deployment tests: Helm chart (helm-python-sdk), kustomize."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "marrowscope"
K8S = ROOT / "k8s"
NAMESPACE = "marrowscope"
RELEASE = "marrowscope"
# kubernetes-validate ships schemas per minor version; 1.32 is a supported, widely deployed one.
KUBE_VERSION = "1.32"
VALUES_FILES = ("values.yaml", "values-dev.yaml", "values-prod.yaml")


def load_values(name: str) -> dict:
    import helm_python

    if name == "values.yaml":  # the chart's defaults apply by themselves
        return {}
    return helm_python.values_from_yaml((CHART / name).read_text())


def render_chart(values: dict, *, namespace: str = NAMESPACE) -> list[dict]:
    """Every object the chart renders for `values`, as dicts (empty documents dropped)."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=namespace)
    return [
        doc
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


LIS_PEER = {"ipBlock": {"cidr": "10.20.0.0/16"}}


def hl7_values(values: dict, **hl7: object) -> dict:
    """`values` with the HL7 listener enabled (and `hl7` settings), its LIS peer named."""
    out = {**values, "hl7": {**values.get("hl7", {}), "enabled": True, **hl7}}
    out["networkPolicy"] = {**values.get("networkPolicy", {}), "lis": [LIS_PEER]}
    return out


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize overlays cannot be rendered here")
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session", params=VALUES_FILES)
def chart_objects(request) -> tuple[str, list[dict]]:
    return request.param, render_chart(load_values(request.param))


@pytest.fixture(scope="session")
def prod_objects() -> list[dict]:
    return render_chart(load_values("values-prod.yaml"))
