"""Kustomize base (generated from the chart), overlays and training Jobs render and validate."""

from __future__ import annotations

import sys

import pytest

from tests.deploy import checks
from tests.deploy.conftest import K8S, ROOT, kustomize

GPU_SERVICES = {"segmentation", "celltype", "npm1", "explain"}


def test_base_is_up_to_date_with_the_chart():
    sys.path.insert(0, str(K8S))
    try:
        import generate_base
    finally:
        sys.path.remove(str(K8S))
    assert generate_base.main(["--check"]) == 0, "run: python k8s/generate_base.py"
    assert generate_base.OUT.read_text().startswith("# GENERATED")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_validates_and_follows_policy(overlay):
    objs = kustomize(K8S / "overlays" / overlay)
    assert checks.validate_all(objs) == []
    checks.check_containers(objs)
    checks.check_labels(objs)
    checks.check_selectors(objs)
    checks.check_exposure(objs, "marrowscope-gateway-api")
    expected_ns = {"dev": "marrowscope-dev", "prod": "marrowscope"}[overlay]
    assert {o["metadata"]["namespace"] for o in objs} == {expected_ns}
    assert not any(
        o["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "Helm" for o in objs
    )


def test_dev_overlay_is_cpu_one_replica():
    objs = kustomize(K8S / "overlays" / "dev")
    deps = checks.by_kind(objs, "Deployment")
    assert len(deps) == 8  # five model services, gateway API and worker, HL7 listener
    for d in deps.values():
        assert d["spec"]["replicas"] == 1
        assert "nvidia.com/gpu" not in checks.pod_spec(d)["containers"][0]["resources"].get(
            "limits", {}
        )
    assert not checks.by_kind(objs, "PodDisruptionBudget")


@pytest.mark.parametrize(
    ("overlay", "peers"),
    [
        ("dev", [{"podSelector": {"matchLabels": {"marrowscope.io/lis-client": "true"}}}]),
        ("prod", [{"ipBlock": {"cidr": "192.0.2.0/24"}}]),
    ],
)
def test_overlays_run_the_hl7_listener_behind_their_lis_policy(overlay, peers):
    """The component generated from the chart: the listener on the gateway's image store,
    its input store, and MLLP admitted from the overlay's LIS peers only."""
    objs = kustomize(K8S / "overlays" / overlay)
    dep = checks.by_kind(objs, "Deployment")["marrowscope-hl7"]
    (c,) = checks.pod_spec(dep)["containers"]
    assert c["command"] == ["python", "-m", "services.hl7"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in checks.pod_spec(dep)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"marrowscope-images", "marrowscope-hl7-inputs"}
    assert set(checks.by_kind(objs, "PersistentVolumeClaim")) == claims | {
        "marrowscope-slide-cache"
    }
    assert checks.check_mllp_policy(objs, "marrowscope-hl7") == peers


def test_prod_overlay_puts_gpu_services_on_gpus():
    deps = checks.by_kind(kustomize(K8S / "overlays" / "prod"), "Deployment")
    for name, d in deps.items():
        svc = d["metadata"]["labels"]["app.kubernetes.io/component"]
        c = checks.pod_spec(d)["containers"][0]
        if svc in GPU_SERVICES:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
            assert c["image"] == "ghcr.io/marrowscope/marrowscope-services:0.1.0-cuda"
            assert checks.pod_spec(d)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), name
            assert c["image"] == "ghcr.io/marrowscope/marrowscope-services:0.1.0"
        assert d["spec"]["replicas"] >= 1


def test_training_jobs_and_indexed_hpo_job():
    objs = kustomize(K8S / "jobs")
    assert checks.validate_all(objs) == []
    checks.check_containers(objs)
    jobs = checks.by_kind(objs, "Job")
    for kind in ("segmentation", "celltype", "ensemble", "npm1"):
        c = checks.pod_spec(jobs[f"marrowscope-train-{kind}"])["containers"][0]
        assert c["command"] == ["python", "-m", f"training.{kind}"]
    hpo = jobs["marrowscope-hpo-npm1"]
    assert hpo["spec"]["completionMode"] == "Indexed" and hpo["spec"]["parallelism"] > 1
    c = checks.pod_spec(hpo)["containers"][0]
    args = c["args"]
    assert "--storage=$(OPTUNA_STORAGE)" in args
    assert any(a.startswith("--hpo-trials=") for a in args)
    assert any(a.startswith("--study=") for a in args), "all workers must join one study"
    # $(OPTUNA_STORAGE) only expands when the variable is defined in the container env
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["OPTUNA_STORAGE"]["valueFrom"]
    assert (ROOT / "k8s" / "jobs" / "training-config.yaml").exists()
