"""Checks shared by the chart and kustomize tests: schema validation and policy rules."""

from __future__ import annotations

import kubernetes_validate

from tests.deploy.conftest import KUBE_VERSION

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
BATCH = ("Job", "CronJob")  # run to completion: no probes
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def validate_all(objs: list[dict]) -> list[str]:
    """Validate built-in kinds against the Kubernetes OpenAPI schemas (strict: unknown fields
    fail); return the kinds left for structural checks (custom resources)."""
    custom = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in CUSTOM_KINDS, f"no schema for {obj['kind']} {obj['apiVersion']}"
            custom.append(obj["kind"])
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}"
            ) from None
    return custom


def pod_template(obj: dict) -> dict:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def pod_spec(obj: dict) -> dict:
    return pod_template(obj)["spec"]


def claim_mounts(workload: dict) -> dict[str, tuple[str, str]]:
    """volume name -> (claim, mount path) of a one-container workload's PVC-backed mounts."""
    spec = pod_spec(workload)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    (c,) = spec["containers"]
    return {
        m["name"]: (claims[m["name"]], m["mountPath"])
        for m in c["volumeMounts"]
        if m["name"] in claims
    }


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def check_containers(objs: list[dict]) -> None:
    """Every container: requests + memory limit, probes (long-running only), hardened
    securityContext, a writable /tmp from an emptyDir, a pinned image."""
    for wl in workloads(objs):
        spec = pod_spec(wl)
        where = f"{wl['kind']}/{wl['metadata']['name']}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            cw = f"{where}:{c['name']}"
            res = c.get("resources", {})
            assert res.get("requests", {}).get("cpu") and res["requests"].get("memory"), cw
            assert res.get("limits", {}).get("memory"), cw
            if wl["kind"] not in BATCH:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{cw} lacks {probe}"
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, cw
            assert sc.get("allowPrivilegeEscalation") is False, cw
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cw
            assert psc.get("runAsNonRoot") or sc.get("runAsNonRoot"), cw
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{cw}: /tmp must be an emptyDir"
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (
                name and tag and tag != "latest" and not tag.startswith("latest")
            ), f"{cw}: image {image} must be pinned, never latest"


def check_labels(objs: list[dict]) -> None:
    for o in objs:
        labels = o["metadata"].get("labels", {})
        for key in RECOMMENDED_LABELS:
            assert labels.get(key), f"{o['kind']}/{o['metadata']['name']} lacks label {key}"


def check_selectors(objs: list[dict]) -> None:
    """Services and PDBs select pods some Deployment creates; named target ports exist."""
    deps = by_kind(objs, "Deployment").values()

    def matching(selector: dict) -> list[dict]:
        return [
            d
            for d in deps
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for svc in by_kind(objs, "Service").values():
        targets = matching(svc["spec"]["selector"])
        assert len(targets) == 1, (
            f"Service {svc['metadata']['name']} selects {len(targets)} Deployments"
        )
        port_names = {
            p["name"] for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            if isinstance(p["targetPort"], str):
                assert p["targetPort"] in port_names, (
                    f"{svc['metadata']['name']}: {p['targetPort']}"
                )
    for pdb in by_kind(objs, "PodDisruptionBudget").values():
        assert len(matching(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]["name"]
    for d in deps:
        assert (
            d["spec"]["selector"]["matchLabels"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        )


def check_exposure(objs: list[dict], gateway_service: str) -> None:
    """Only the gateway API and the HL7 listener's MLLP leave the namespace;
    NetworkPolicies guard the model services and name who may reach MLLP."""
    hl7_service = gateway_service.removesuffix("-gateway-api") + "-hl7"
    for svc in by_kind(objs, "Service").values():
        if svc["metadata"]["name"] not in (gateway_service, hl7_service):
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    for ing in by_kind(objs, "Ingress").values():
        backends = {
            p["backend"]["service"]["name"]
            for rule in ing["spec"]["rules"]
            for p in rule["http"]["paths"]
        }
        assert backends == {gateway_service}, f"Ingress exposes {backends}"
        assert ing["spec"].get("tls"), "the gateway Ingress must terminate TLS"
    policies = by_kind(objs, "NetworkPolicy").values()
    assert policies, "NetworkPolicies are required"
    model_pols = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels", {}).get("marrowscope.io/tier") == "model"
    ]
    assert len(model_pols) == 1
    grpc_rules = [
        r
        for r in model_pols[0]["spec"]["ingress"]
        if {"port": 8001, "protocol": "TCP"} in r["ports"]
    ]
    assert len(grpc_rules) == 1
    peers = grpc_rules[0]["from"]
    # a namespaceSelector or ipBlock peer would admit callers from outside the namespace
    assert all(set(peer) == {"podSelector"} for peer in peers), f"gRPC open to {peers}"
    sources = {
        peer["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        for peer in peers
    }
    assert sources == {"gateway-api", "gateway-worker"}
    for rule in model_pols[0]["spec"]["ingress"]:
        if rule is not grpc_rules[0]:
            assert rule["ports"] == [{"port": 8002, "protocol": "TCP"}], (
                "non-gateway peers reach metrics only"
            )
    if hl7_service in by_kind(objs, "Deployment"):
        check_mllp_policy(objs, hl7_service)
    # every pod is selected by some policy (an unselected pod accepts anything)
    for wl in workloads(objs):
        labels = pod_template(wl)["metadata"]["labels"]
        assert any(
            p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for p in policies
        ), f"no NetworkPolicy selects {wl['kind']}/{wl['metadata']['name']}"


def check_mllp_policy(objs: list[dict], name: str) -> list[dict]:
    """The HL7 listener's policy admits named peers on the MLLP ports and Prometheus on the
    metrics port, nothing else; returns the MLLP rule's peers."""
    policy = by_kind(objs, "NetworkPolicy")[name]
    (dep,) = [d for d in by_kind(objs, "Deployment").values() if d["metadata"]["name"] == name]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["containerPort"]: p["name"] for p in pod_spec(dep)["containers"][0]["ports"]}
    mllp = {port for port, pname in ports.items() if pname.startswith("mllp")}
    mllp_rule, metrics_rule = policy["spec"]["ingress"]
    assert {p["port"] for p in mllp_rule["ports"]} == mllp
    # an empty `from` (or an empty peer) admits everyone
    assert mllp_rule.get("from") and all(mllp_rule["from"]), f"MLLP open to {mllp_rule}"
    assert metrics_rule["ports"] == [{"port": 8002, "protocol": "TCP"}]
    return mllp_rule["from"]
