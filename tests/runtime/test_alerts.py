"""The chart's model-service alerts and dashboard query what the runtime really exports:
metric names from ``RuntimeMetrics`` and the ``status`` label values it writes."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.errors import status_label
from services.runtime.metrics import RuntimeMetrics

pytest.importorskip("helm_python")


@pytest.fixture(scope="module")
def prod_objects() -> list[dict]:
    from tests.deploy.conftest import load_values, render_chart

    return render_chart(load_values("values-prod.yaml"))


def _exported_names() -> set[str]:
    from prometheus_client import generate_latest

    metrics = RuntimeMetrics()
    metrics.requests.labels("m", "1", "ok").inc()
    for name in ("request_seconds", "queue_seconds", "compute_seconds", "batch_size"):
        getattr(metrics, name).labels("m", "1").observe(1)
    metrics.inflight.labels("m").inc()
    metrics.model_info.labels("m", "1").set(1)
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _model_exprs(objects: list[dict]) -> dict[str, str]:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    (group,) = [g for g in rule["spec"]["groups"] if g["name"] == "marrowscope.models"]
    return {r["alert"]: r["expr"] for r in group["rules"]}


def test_error_rate_alert_and_dashboard_exclude_the_ok_label(prod_objects):
    ok = status_label(None)
    exprs = _model_exprs(prod_objects)
    (cm,) = [
        o for o in prod_objects if o["kind"] == "ConfigMap" and "marrowscope.json" in o["data"]
    ]
    dashboard = json.loads(cm["data"]["marrowscope.json"])
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in [exprs["MarrowScopeHighErrorRate"], *queries]:
        for value in re.findall(r'status!?="([^"]*)"', expr):
            # a comparison with a value the runtime never writes matches every request
            assert value == ok, expr


def test_oversized_messages_alert_uses_the_runtime_counter(prod_objects):
    exprs = _model_exprs(prod_objects)
    expr = exprs["MarrowScopeOversizedMessages"]
    assert "marrowscope_oversized_messages_total" in expr and "> 0" in expr
    exported = _exported_names()
    for expr in exprs.values():
        for name in re.findall(r"marrowscope_[a-z_]+", expr):
            assert name in exported, (name, sorted(exported))
