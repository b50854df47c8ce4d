"""The chart's HL7 order listener (`hl7.enabled`): absent by default; when enabled, a
hardened Deployment whose rendered environment the listener's own settings classes accept,
a Service scraped like the others, the gateway's image store, a read-only input store, and a
NetworkPolicy that admits only the named LIS peers on MLLP."""

from __future__ import annotations

import pytest

from tests.deploy import checks
from tests.deploy.conftest import (
    CHART,
    LIS_PEER,
    NAMESPACE,
    RELEASE,
    VALUES_FILES,
    hl7_values,
    load_values,
    render_chart,
)

HL7 = f"{RELEASE}-hl7"


@pytest.fixture(scope="module")
def enabled() -> list[dict]:
    return render_chart(hl7_values(load_values("values-prod.yaml")))


def _container(objs: list[dict]) -> dict:
    (c,) = checks.pod_spec(checks.by_kind(objs, "Deployment")[HL7])["containers"]
    return c


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_absent_unless_enabled(values_file):
    objs = render_chart(load_values(values_file))
    assert not [o for o in objs if "hl7" in o["metadata"]["name"]]
    for rule in checks.by_kind(objs, "PrometheusRule").values():
        assert "marrowscope.hl7" not in {g["name"] for g in rule["spec"]["groups"]}


def test_enabled_validates_lints_and_follows_policy(enabled):
    import helm_python

    assert sorted(checks.validate_all(enabled)) == ["PrometheusRule", "ServiceMonitor"]
    checks.check_containers(enabled)
    checks.check_labels(enabled)
    checks.check_selectors(enabled)
    checks.check_exposure(enabled, f"{RELEASE}-gateway-api")
    assert checks.check_mllp_policy(enabled, HL7) == [LIS_PEER]
    report = helm_python.lint(
        CHART, hl7_values(load_values("values-prod.yaml")), strict=True, namespace=NAMESPACE
    )
    assert report["errors"] == [] and report["messages"] == [], report


def test_rendered_environment_is_what_the_listener_reads(enabled, monkeypatch):
    """The env the chart writes, read by the listener's own settings classes: MLLP on every
    interface, metrics on 8002, the gateway's job store and image store."""
    from services.gateway.config import GatewaySettings
    from services.hl7.config import Hl7ListenerSettings

    c = _container(enabled)
    assert c["command"] == ["python", "-m", "services.hl7"]
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MS_GATEWAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
        "marrowscope-gateway-db"
    )
    assert "MS_GATEWAY_WEBHOOK_SECRET" not in env, "the listener signs no webhooks"
    settings = Hl7ListenerSettings()
    assert settings.host == "0.0.0.0" and settings.metrics_port == 8002
    assert settings.listeners() == {2575: None}
    assert str(settings.input_root) == "/var/lib/marrowscope/hl7-inputs"
    assert settings.max_connections == 64 and settings.max_message_bytes == 1024 * 1024
    monkeypatch.setenv("MS_GATEWAY_DATABASE_URL", "postgresql+psycopg://u@db/x")
    gateway = GatewaySettings()
    # the image's /app is read-only: every writable path is a volume or /tmp
    assert str(gateway.image_root) == "/var/lib/marrowscope/images"
    assert str(gateway.data_dir).startswith("/tmp/")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"mllp": 2575, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "mllp"}


def test_volumes_are_the_gateway_image_store_and_a_read_only_input_store(enabled):
    deps = checks.by_kind(enabled, "Deployment")
    spec = checks.pod_spec(deps[HL7])
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    worker_claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in checks.pod_spec(deps[f"{RELEASE}-gateway-worker"])["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims["images"]["claimName"] in worker_claims
    # slides come only from local roots, read in place: the listener writes no slide cache
    assert "slide-cache" not in claims
    assert claims["inputs"] == {"claimName": f"{RELEASE}-hl7-inputs", "readOnly": True}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["images"]["mountPath"] == "/var/lib/marrowscope/images"
    assert mounts["inputs"]["readOnly"] is True
    pvc = checks.by_kind(enabled, "PersistentVolumeClaim")[f"{RELEASE}-hl7-inputs"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_input_store_can_be_an_existing_claim_or_off():
    base = load_values("values.yaml")
    objs = render_chart(hl7_values(base, inputStore={"existingClaim": "lis-drop"}))
    assert f"{RELEASE}-hl7-inputs" not in checks.by_kind(objs, "PersistentVolumeClaim")
    vols = checks.pod_spec(checks.by_kind(objs, "Deployment")[HL7])["volumes"]
    assert {"claimName": "lis-drop", "readOnly": True} in [
        v.get("persistentVolumeClaim") for v in vols
    ]
    objs = render_chart(hl7_values(base, inputStore={"enabled": False}, slideStore="lab"))
    c = _container(objs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "MS_HL7_INPUT_ROOT" not in env and env["MS_HL7_SLIDE_STORE"] == "lab"
    assert {m["name"] for m in c["volumeMounts"]} == {"tmp", "images"}
    assert not [o for o in objs if o["metadata"]["name"].endswith("hl7-inputs")]


def test_tenant_ports_and_an_external_service(monkeypatch):
    from services.hl7.config import Hl7ListenerSettings

    values = hl7_values(
        load_values("values.yaml"),
        tenantPorts={"site-b": 2577, "site-a": 2576},
        facilityTenants={"HEMLAB": "site-a"},
        service={"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.20.0.0/16"]},
    )
    objs = render_chart(values)
    checks.validate_all(objs)
    checks.check_selectors(objs)
    checks.check_exposure(objs, f"{RELEASE}-gateway-api")
    c = _container(objs)
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    settings = Hl7ListenerSettings()
    assert settings.listeners() == {2575: None, 2576: "site-a", 2577: "site-b"}
    assert settings.facility_tenants == {"HEMLAB": "site-a"}
    svc = checks.by_kind(objs, "Service")[HL7]["spec"]
    assert {p["port"] for p in svc["ports"]} == {2575, 2576, 2577, 8002}
    assert svc["type"] == "LoadBalancer" and svc["externalTrafficPolicy"] == "Local"
    assert svc["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
    # the LIS reaches MLLP; nobody outside reaches the unauthenticated metrics port but Prometheus
    policy = checks.by_kind(objs, "NetworkPolicy")[HL7]["spec"]["ingress"]
    assert {p["port"] for p in policy[0]["ports"]} == {2575, 2576, 2577}


def test_no_open_mllp_port_without_named_peers():
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match="networkPolicy.lis"):
        render_chart({"hl7": {"enabled": True}})
    objs = render_chart({"hl7": {"enabled": True}, "networkPolicy": {"enabled": False}})
    assert HL7 in checks.by_kind(objs, "Deployment")


def test_listener_is_scraped_and_alerted_on(enabled):
    (sm,) = checks.by_kind(enabled, "ServiceMonitor").values()
    svc = checks.by_kind(enabled, "Service")[HL7]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    (rule,) = checks.by_kind(enabled, "PrometheusRule").values()
    (group,) = [g for g in rule["spec"]["groups"] if g["name"] == "marrowscope.hl7"]
    assert {r["alert"] for r in group["rules"]} == {
        "MarrowScopeHl7ListenerDown",
        "MarrowScopeHl7Nacks",
        "MarrowScopeHl7ConnectionsDropped",
    }


@pytest.mark.parametrize(
    ("hl7", "where"),
    [
        ({"limits": {"maxConnection": 8}}, "maxConnection"),
        ({"port": 8002}, "port"),
        ({"tenantPorts": {"a": "2576"}}, "tenantPorts"),
        ({"service": {"type": "ExternalName"}}, "type"),
        ({"inputStore": {"mountPath": "inputs"}}, "mountPath"),
    ],
)
def test_misspelt_or_invalid_hl7_values_fail_schema(hl7, where):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=where):
        render_chart(hl7_values({}, **hl7))
