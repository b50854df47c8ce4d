"""The chart makes per-request balancing possible: every model Service is headless (its name
lists every ready pod) and the gateway dials `dns:///` names with `round_robin`."""

from __future__ import annotations

import pytest

from services.gateway.config import SERVICES, GatewaySettings
from tests.deploy.conftest import RELEASE, VALUES_FILES, load_values, render_chart


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_model_services_are_headless_and_gateway_balances(values_file: str) -> None:
    objs = render_chart(load_values(values_file))
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    gateway = [
        deployments[f"{RELEASE}-gateway-{part}"]
        for part in ("api", "worker")
        if f"{RELEASE}-gateway-{part}" in deployments
    ]
    assert gateway, "no gateway Deployment rendered"
    for name in SERVICES:
        svc = services.get(f"{RELEASE}-{name}")
        if svc is None:
            continue  # disabled in this values file
        assert svc["spec"]["clusterIP"] == "None", svc["metadata"]["name"]
        for dep in gateway:
            env = {
                e["name"]: e.get("value")
                for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            assert env[f"MS_GATEWAY_{name.upper()}_ADDR"] == f"dns:///{RELEASE}-{name}:8001"
            assert env["MS_GATEWAY_LB_POLICY"] == "round_robin"
            # The settings accept what the chart sets.
            settings = GatewaySettings(lb_policy=env["MS_GATEWAY_LB_POLICY"])
            assert settings.lb_policy == "round_robin"
