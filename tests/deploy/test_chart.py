"""The Helm chart renders valid, policy-conforming manifests for every values file."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy import checks
from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, VALUES_FILES, load_values, render_chart

MODEL_SERVICES = ("segmentation", "celltype", "ensemble", "npm1", "explain")
GPU_SERVICES = ("segmentation", "celltype", "npm1", "explain")
GATEWAY = f"{RELEASE}-gateway-api"


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lint_is_clean(values_file):
    import helm_python

    report = helm_python.lint(CHART, load_values(values_file), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and report["messages"] == [], report


def test_objects_validate_against_kubernetes_schemas(chart_objects):
    name, objs = chart_objects
    custom = checks.validate_all(objs)
    if name == "values-prod.yaml":
        assert sorted(custom) == ["PrometheusRule", "ServiceMonitor"]


def test_policies(chart_objects):
    _, objs = chart_objects
    checks.check_containers(objs)
    checks.check_labels(objs)
    checks.check_selectors(objs)
    checks.check_exposure(objs, GATEWAY)


def test_model_services_wiring(chart_objects):
    """Command, ports, env prefix, gRPC probes and rolling strategy of every model service."""
    _, objs = chart_objects
    deps = checks.by_kind(objs, "Deployment")
    for svc in MODEL_SERVICES:
        d = deps[f"{RELEASE}-{svc}"]
        (c,) = checks.pod_spec(d)["containers"]
        assert c["command"] == ["python", "-m", f"services.{svc}"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "grpc": 8001,
            "metrics": 8002,
        }
        env = {e["name"]: e.get("value") for e in c["env"]}
        prefix = f"MS_{svc.upper()}_"
        assert env[f"{prefix}GRPC_PORT"] == "8001" and env[f"{prefix}METRICS_PORT"] == "8002"
        kind = "npm1" if svc == "explain" else svc
        assert env[f"{prefix}MODEL_URI"] == f"models:/marrowscope-{kind}@champion"
        for key in (
            "POLL_INTERVAL_S",
            "MAX_BATCH_SIZE",
            "MAX_QUEUE_DELAY_MS",
            "DEVICE",
            "AUTOCAST",
            "GRACE_PERIOD_S",
            "VERSION_GRACE_S",
            "MAX_MESSAGE_BYTES",
        ):
            assert env[prefix + key] not in (None, ""), prefix + key
        assert env["MLFLOW_TRACKING_URI"].startswith("http")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": 8001}
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        grace = int(env[f"{prefix}GRACE_PERIOD_S"])
        assert checks.pod_spec(d)["terminationGracePeriodSeconds"] > grace
    gw_env = {e["name"]: e for e in checks.pod_spec(deps[GATEWAY])["containers"][0]["env"]}
    for svc in MODEL_SERVICES:
        assert gw_env[f"MS_GATEWAY_{svc.upper()}_ADDR"]["value"] == f"dns:///{RELEASE}-{svc}:8001"
    for secret_env in ("MS_GATEWAY_DATABASE_URL", "MS_GATEWAY_WEBHOOK_SECRET"):
        assert "secretKeyRef" in gw_env[secret_env]["valueFrom"]
    # report URLs from the ingress host, never from a request's Host header
    if checks.by_kind(objs, "Ingress"):
        assert gw_env["MS_GATEWAY_PUBLIC_BASE_URL"]["value"] == "https://marrowscope.example.org"
    else:
        assert "MS_GATEWAY_PUBLIC_BASE_URL" not in gw_env
    worker = checks.pod_spec(deps[f"{RELEASE}-gateway-worker"])["containers"][0]
    assert worker["command"] == ["python", "-m", "services.gateway.worker"]


def test_dev_is_cpu_with_one_replica_each():
    objs = render_chart(load_values("values-dev.yaml"))
    for d in checks.by_kind(objs, "Deployment").values():
        assert d["spec"]["replicas"] == 1, d["metadata"]["name"]
        (c,) = checks.pod_spec(d)["containers"]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert not c["image"].endswith("-cuda")
    assert not checks.by_kind(objs, "HorizontalPodAutoscaler")


def test_prod_gpu_services_request_gpus_and_autoscale(prod_objects):
    deps = checks.by_kind(prod_objects, "Deployment")
    hpas = checks.by_kind(prod_objects, "HorizontalPodAutoscaler")
    for svc in MODEL_SERVICES:
        d = deps[f"{RELEASE}-{svc}"]
        (c,) = checks.pod_spec(d)["containers"]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if svc in GPU_SERVICES:
            assert gpus == 1 and c["image"].endswith("-cuda"), svc
            assert any(t["key"] == "nvidia.com/gpu" for t in checks.pod_spec(d)["tolerations"])
        else:
            assert gpus is None and not c["image"].endswith("-cuda"), svc
        # HPA owns the replica count: the Deployment must not fight it
        assert "replicas" not in d["spec"]
        hpa = hpas[f"{RELEASE}-{svc}"]["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": d["metadata"]["name"],
        }
        (metric,) = hpa["metrics"]
        assert (
            metric["type"] == "Pods"
            and metric["pods"]["metric"]["name"] == "marrowscope_inflight_requests"
        )
        assert hpa["minReplicas"] <= hpa["maxReplicas"]


def test_keda_engine_renders_scaled_objects_instead_of_hpas():
    values = load_values("values-prod.yaml")
    values["autoscaling"] = {"engine": "keda"}
    objs = render_chart(values)
    assert not checks.by_kind(objs, "HorizontalPodAutoscaler")
    scaled = checks.by_kind(objs, "ScaledObject")
    deps = checks.by_kind(objs, "Deployment")
    assert sorted(scaled) == sorted(f"{RELEASE}-{s}" for s in MODEL_SERVICES)
    assert sorted(checks.validate_all(objs)).count("ScaledObject") == len(MODEL_SERVICES)
    for name, so in scaled.items():
        spec = so["spec"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["name"] in deps
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trig,) = spec["triggers"]
        assert trig["type"] == "prometheus"
        meta = trig["metadata"]
        assert all(
            isinstance(meta[k], str) and meta[k] for k in ("serverAddress", "query", "threshold")
        )
        svc = name.removeprefix(f"{RELEASE}-")
        assert f'model="{svc}"' in meta["query"] and f'namespace="{NAMESPACE}"' in meta["query"]
        float(meta["threshold"])


def _balanced(expr: str) -> bool:
    depth = 0
    for ch in expr:
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_monitoring_custom_resources_are_well_formed(prod_objects):
    (sm,) = checks.by_kind(prod_objects, "ServiceMonitor").values()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"]["marrowscope.io/scrape"] == "true"
    # the gateway API's metrics too: its `http` port serves /metrics only to an ops key
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics"}
    scraped = [
        s
        for s in checks.by_kind(prod_objects, "Service").values()
        if s["metadata"]["labels"].get("marrowscope.io/scrape") == "true"
    ]
    assert len(scraped) == len(MODEL_SERVICES) + 2  # + gateway API and worker
    for s in scraped:
        assert "metrics" in {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]
    for d in checks.by_kind(prod_objects, "Deployment").values():
        if "gateway" in d["metadata"]["name"]:
            (c,) = d["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["MS_GATEWAY_METRICS_PORT"] == "8002"
            assert {"name": "metrics", "containerPort": 8002, "protocol": "TCP"} in c["ports"]

    (rule,) = checks.by_kind(prod_objects, "PrometheusRule").values()
    alerts = {}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert r["alert"] and isinstance(r["expr"], str) and r["labels"]["severity"]
            assert "{{" not in r["expr"] and _balanced(r["expr"]), r["expr"]
            assert f'namespace="{NAMESPACE}"' in r["expr"]
            alerts[r["alert"]] = r["expr"]
    assert "marrowscope_requests_total" in alerts["MarrowScopeHighErrorRate"]
    assert "marrowscope_request_seconds_bucket" in alerts["MarrowScopeHighP99Latency"]
    assert "marrowscope_queue_seconds_bucket" in alerts["MarrowScopeHighQueueTime"]
    assert "kube_deployment_status_replicas_available" in alerts["MarrowScopeModelNotReady"]
    assert alerts["MarrowScopeModelVersionMissing"].count("absent(") == len(MODEL_SERVICES)
    # the counter the gateway exports (tests/gateway/test_request_guard.py)
    assert "marrowscope_gateway_rejected_requests_total" in alerts["MarrowScopeGatewayRejections"]


def test_dashboard_configmap_queries_documented_metrics(prod_objects):
    (cm,) = checks.by_kind(prod_objects, "ConfigMap").values()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["marrowscope.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"marrowscope_[a-z_]+", e)}
    assert used == {
        "marrowscope_requests_total",
        "marrowscope_request_seconds_bucket",
        "marrowscope_queue_seconds_bucket",
        "marrowscope_compute_seconds_bucket",
        "marrowscope_inflight_requests",
        "marrowscope_model_info",
        "marrowscope_gateway_jobs",
        "marrowscope_gateway_queue_depth",
    }
    assert all(_balanced(e) for e in exprs)


def test_mlflow_server_uses_postgres_secret_and_serves_artifacts(prod_objects):
    d = checks.by_kind(prod_objects, "Deployment")[f"{RELEASE}-mlflow"]
    (c,) = checks.pod_spec(d)["containers"]
    assert c["command"][:2] == ["mlflow", "server"] and "--serve-artifacts" in c["command"]
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert f"{RELEASE}-mlflow:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    model_env = checks.pod_spec(checks.by_kind(prod_objects, "Deployment")[f"{RELEASE}-npm1"])[
        "containers"
    ][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": f"http://{RELEASE}-mlflow:5000"} in model_env


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"modelServices": {"npm1": {"replicass": 2}}}, "replicass"),
        ({"modelServices": {"npm2": {"enabled": True}}}, "npm2"),
        ({"modelServices": {"npm1": {"batching": {"maxBatchsize": 8}}}}, "maxBatchsize"),
        ({"modelServices": {"npm1": {"resources": {"limit": {"nvidia.com/gpu": 1}}}}}, "limit"),
        ({"modelServices": {"npm1": {"device": "gpu"}}}, "device"),
        ({"gateway": {"api": {"replica": 3}}}, "replica"),
        ({"ingres": {"enabled": True}}, "ingres"),
        ({"autoscaling": {"engine": "kedа"}}, "engine"),
        ({"image": {"tag": "latest"}}, "tag"),
        ({"gateway": {"slideCache": {"mountpath": "/slides"}}}, "mountpath"),
        ({"gateway": {"slideCache": {"mountPath": "slides"}}}, "mountPath"),
        ({"gateway": {"slideCache": {"accessModes": ["ReadWriteAll"]}}}, "accessModes"),
    ],
)
def test_misspelt_or_invalid_values_fail_schema(values, where):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=where):
        render_chart(values)


def test_pdf_signing_key_is_mounted_only_when_configured():
    """Signed-out PDF reports are signed with the lab's key from a Secret: the gateway's
    API and worker pods get the PKCS#12 file (read-only) and its password, or nothing."""
    values = load_values("values-prod.yaml")
    plain = checks.by_kind(render_chart(values), "Deployment")
    values.setdefault("gateway", {})["pdfSigning"] = {
        "secretName": "lab-signing",
        "p12Key": "lab.p12",
        "passwordKey": "password",
        "location": "Haematology lab",
    }
    signed = checks.by_kind(render_chart(values), "Deployment")
    for component in ("gateway-api", "gateway-worker"):
        name = f"{RELEASE}-{component}"
        for deps, want in ((plain, False), (signed, True)):
            pod = deps[name]["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            env = {e["name"]: e for e in c["env"]}
            assert ("MS_GATEWAY_PDF_SIGNING_P12" in env) is want
            assert any(v["name"] == "pdf-signing" for v in pod["volumes"]) is want
            if want:
                assert env["MS_GATEWAY_PDF_SIGNING_P12"]["value"].endswith("/lab.p12")
                ref = env["MS_GATEWAY_PDF_SIGNING_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "lab-signing", "key": "password"}
                mount = next(m for m in c["volumeMounts"] if m["name"] == "pdf-signing")
                assert mount["readOnly"] is True
                assert env["MS_GATEWAY_PDF_SIGNING_P12"]["value"].startswith(mount["mountPath"])


SLIDE_CACHE = "/var/lib/marrowscope/slides"


def test_api_and_worker_share_the_slide_cache(chart_objects, monkeypatch):
    """An upload lands on one API pod and is cut by whichever worker pod claims its
    analysis: both mount one claim at the path the gateway's settings read as the slide
    cache, a volume kept on uninstall and big enough for several of the largest slides."""
    from kubernetes.utils import parse_quantity

    from services.gateway.config import GatewaySettings

    name, objs = chart_objects
    deps = checks.by_kind(objs, "Deployment")
    api, worker = (deps[f"{RELEASE}-gateway-{c}"] for c in ("api", "worker"))
    claim = f"{RELEASE}-slide-cache"
    for dep in (api, worker):
        assert checks.claim_mounts(dep)["slide-cache"] == (claim, SLIDE_CACHE)
        (c,) = checks.pod_spec(dep)["containers"]
        for e in c["env"]:
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
        settings = GatewaySettings(database_url="postgresql+psycopg://u@db/x")
        assert str(settings.slide_cache_dir) == SLIDE_CACHE
    pvc = checks.by_kind(objs, "PersistentVolumeClaim")[claim]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    size = parse_quantity(pvc["spec"]["resources"]["requests"]["storage"])
    assert size >= 2 * GatewaySettings.model_fields["max_slide_bytes"].default, name
    modes = pvc["spec"]["accessModes"]
    assert modes == (["ReadWriteOnce"] if name == "values-dev.yaml" else ["ReadWriteMany"])


def test_existing_slide_cache_claim_is_mounted_and_not_created():
    values = load_values("values-prod.yaml")
    values.setdefault("gateway", {})["slideCache"] = {
        "existingClaim": "lab-slides",
        "mountPath": "/mnt/slides",
    }
    objs = render_chart(values)
    assert f"{RELEASE}-slide-cache" not in checks.by_kind(objs, "PersistentVolumeClaim")
    assert f"{RELEASE}-images" in checks.by_kind(objs, "PersistentVolumeClaim")
    for component in ("api", "worker"):
        dep = checks.by_kind(objs, "Deployment")[f"{RELEASE}-gateway-{component}"]
        assert checks.claim_mounts(dep)["slide-cache"] == ("lab-slides", "/mnt/slides")
        env = {e["name"]: e.get("value") for e in checks.pod_spec(dep)["containers"][0]["env"]}
        assert env["MS_GATEWAY_SLIDE_CACHE_DIR"] == "/mnt/slides"
