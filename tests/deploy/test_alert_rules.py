"""The chart's alert rules, evaluated: the exact expressions of the rendered PrometheusRule
(values-prod.yaml) run over 40 minutes of synthetic metric series scraped every 30 s from
the real exporters (`RuntimeMetrics`, `GatewayMetrics`, `Hl7Metrics`; kube-state-metrics is
synthesised), with the HL7 listener enabled,
with each rule's `for:` duration. Healthy services must not fire; each failing one fires for
its own labels only. The evaluator is `tests/deploy/promql.py`.

`test_a_wrong_rule_fails_the_scenarios` proves the scenarios can tell: every mutation (an
error ratio that counts every request, a flipped comparison, a lost namespace or `le`, a
dropped model) makes them fail. Synthetic series, not production traffic."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from services.hl7.metrics import Hl7Metrics
from services.runtime.errors import status_label
from services.runtime.metrics import RuntimeMetrics
from tests.deploy.promql import Evaluator, PromQLError, Series

pytest.importorskip("helm_python")

NS = "marrowscope"
SCRAPE_S = 30.0
END_S = 40 * 60.0
MODELS = ("celltype", "ensemble", "explain", "npm1", "segmentation")
ERROR = status_label(RuntimeError("boom"))  # what the runtime writes for an unexpected error
UNAVAILABLE = "unavailable"

# alert -> (the label that names what fires, the values that must fire)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "MarrowScopeHighErrorRate": ("model", {"celltype"}),
    "MarrowScopeHighP99Latency": ("model", {"ensemble"}),
    "MarrowScopeHighQueueTime": ("model", {"ensemble"}),
    "MarrowScopeOversizedMessages": ("service", {"marrowscope-npm1"}),
    "MarrowScopeModelNotReady": ("deployment", {"marrowscope-npm1"}),
    "MarrowScopeModelVersionMissing": ("model", {"explain"}),
    "MarrowScopeGatewayBacklog": ("", {""}),  # max() without by: one unlabelled alert
    "MarrowScopeGatewayRejections": ("status", {"401"}),
    "MarrowScopeGatewaySweepFailing": ("namespace", {NS}),
    "MarrowScopeHl7ListenerDown": ("deployment", {"marrowscope-hl7"}),
    "MarrowScopeHl7Nacks": ("type", {"ORM^O01"}),
    "MarrowScopeHl7ConnectionsDropped": ("reason", {"framing"}),
}


class Cluster:
    """Exporters scraped every `SCRAPE_S` like Prometheus, with the target's labels."""

    def __init__(self) -> None:
        self.series = Series()
        self.targets: list[tuple[object, dict[str, str]]] = []

    def target(self, registry: object, **labels: str) -> None:
        self.targets.append((registry, labels))

    def run(self, tick: Callable[[float], None]) -> None:
        t = 0.0
        while t <= END_S:
            tick(t)
            for registry, target in self.targets:
                text = generate_latest(registry).decode()
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        labels = {"__name__": s.name, **s.labels, **target}
                        self.series.add(labels, t, s.value)
            t += SCRAPE_S


def _latencies(histogram, n: int, slow_share: float, fast_s: float, slow_s: float) -> None:
    slow = round(n * slow_share)
    for _ in range(n - slow):
        histogram.observe(fast_s)
    for _ in range(slow):
        histogram.observe(slow_s)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    """Production namespace: celltype fails 9 % of requests, segmentation 1 % (below the
    5 % ratio), ensemble has a slow tail and queues, npm1 refuses oversized messages and has
    no ready pod, explain reports no loaded version, the gateway has a backlog and answers
    401 to a misconfigured LIS. The HL7 listener has no ready pod, answers AR to 30 % of
    ORM^O01 orders (OML^O33: 5 % AE, below the 10 % ratio) and closes a connection a minute
    for framing (idle and peer closes are normal). Two storage-sweep runs failed, one
    succeeded. A staging namespace fails every segmentation request, refuses every HL7
    order and fails its sweep twice."""
    c = Cluster()
    models = {m: RuntimeMetrics() for m in MODELS}
    for m, metrics in models.items():
        c.target(metrics.registry, namespace=NS, service=f"marrowscope-{m}", pod=f"{m}-0")
        if m != "explain":
            metrics.set_loaded(m, "3", True)
    staging = RuntimeMetrics()
    staging.set_loaded("segmentation", "3", True)
    c.target(staging.registry, namespace="staging", service="marrowscope-segmentation")
    gateway = GatewayMetrics()
    depth = {"queued": 0}
    gateway.watch_jobs(lambda: dict(depth))
    c.target(gateway.registry, namespace=NS, service="marrowscope-gateway", pod="gw-0")
    hl7 = Hl7Metrics()
    c.target(hl7.registry, namespace=NS, service="marrowscope-hl7", pod="hl7-0")
    hl7_staging = Hl7Metrics()
    c.target(hl7_staging.registry, namespace="staging", service="marrowscope-hl7")

    def tick(t: float) -> None:
        for m, metrics in models.items():
            errors = {"celltype": (ERROR, 30), "segmentation": (UNAVAILABLE, 3)}.get(m)
            metrics.requests.labels(m, "3", "ok").inc(300)  # 10/s
            if errors:
                metrics.requests.labels(m, "3", errors[0]).inc(errors[1])
            slow = 0.02 if m == "ensemble" else 0.0
            _latencies(metrics.request_seconds.labels(m, "3"), 100, slow, 0.04, 5.0)
            queued = 0.2 if m == "ensemble" else 0.0
            _latencies(metrics.queue_seconds.labels(m, "3"), 100, queued, 0.004, 0.9)
        models["npm1"].oversized.labels("received").inc(3)
        staging.requests.labels("segmentation", "3", ERROR).inc(3000)
        depth["queued"] = 150 if t >= 10 * 60 else 20
        gateway.rejected.labels("/v1/analyses", "401").inc(15)  # 0.5/s
        gateway.rejected.labels("/v1/analyses", "413").inc(3)  # 0.1/s: below 0.2/s
        gateway.rejected.labels("/v1/analyses", "503").inc(300)  # not a 4xx rejection
        hl7.messages.labels("OML^O33", "AA").inc(19)
        hl7.messages.labels("OML^O33", "AE").inc(1)
        hl7.messages.labels("ORM^O01", "AA").inc(7)
        hl7.messages.labels("ORM^O01", "AR").inc(3)
        hl7.closed.labels("peer").inc(20)
        hl7.closed.labels("idle").inc(2)
        if t % 60 == 0:
            hl7.closed.labels("framing").inc()
        hl7_staging.messages.labels("OML^O33", "AE").inc(10)
        hl7_staging.closed.labels("oversized").inc(10)

    c.run(tick)
    for m in MODELS:  # kube-state-metrics: npm1 has no ready pod, nor has a non-model one
        ready = 0.0 if m == "npm1" else 1.0
        for k in range(int(END_S // SCRAPE_S) + 1):
            c.series.add(
                {
                    "__name__": "kube_deployment_status_replicas_available",
                    "namespace": NS,
                    "deployment": f"marrowscope-{m}",
                },
                k * SCRAPE_S,
                ready,
            )
    for deployment in ("marrowscope-mlflow", "marrowscope-hl7"):
        for k in range(int(END_S // SCRAPE_S) + 1):
            c.series.add(
                {
                    "__name__": "kube_deployment_status_replicas_available",
                    "namespace": NS,
                    "deployment": deployment,
                },
                k * SCRAPE_S,
                0.0,
            )
    # the storage sweep failed twice (and succeeded once) here, twice in staging
    _jobs(c.series, NS, {"sweep-1": False, "sweep-2": False, "sweep-3": True})
    _jobs(c.series, "staging", {"sweep-1": False, "sweep-2": False})
    return c


SWEEP_JOB = "marrowscope-gateway-sweep-{}"


def _jobs(series: Series, namespace: str, outcome: dict[str, bool]) -> None:
    """kube-state-metrics' kube_job_failed: per Job one series per condition, 0 or 1.
    Keys `sweep-<n>` are Jobs of the sweep CronJob (named <cronjob>-<minute>), others as given;
    values: whether the Job succeeded."""
    for key, succeeded in outcome.items():
        name = SWEEP_JOB.format(28_000_000 + int(key[6:])) if key.startswith("sweep-") else key
        for condition, value in (("true", not succeeded), ("false", succeeded), ("unknown", False)):
            labels = {"__name__": "kube_job_failed", "namespace": namespace, "job_name": name}
            for k in range(int(END_S // SCRAPE_S) + 1):
                series.add({**labels, "condition": condition}, k * SCRAPE_S, float(value))


@pytest.fixture(scope="module")
def rules() -> dict[str, dict]:
    from tests.deploy.conftest import hl7_values, load_values, render_chart

    values = hl7_values(load_values("values-prod.yaml"))
    (rule,) = [o for o in render_chart(values) if o["kind"] == "PrometheusRule"]
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def _seconds(duration: str) -> float:
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def _misfires(cluster: Cluster, alert: str, expr: str, for_: str) -> list[str]:
    """What is wrong with `expr` on the scenario (empty: it fires exactly as expected)."""
    key, want = EXPECTED[alert]
    try:
        fired = Evaluator(cluster.series).fires(expr, END_S, _seconds(for_))
    except (PromQLError, KeyError, ValueError) as exc:
        return [f"{alert}: does not evaluate: {exc}"]
    got = {dict(labels).get(key, "") for labels in fired}
    return [] if got == want else [f"{alert}: fired for {sorted(got)}, expected {sorted(want)}"]


def test_every_rule_has_a_scenario(rules):
    assert set(rules) == set(EXPECTED)


@pytest.mark.parametrize("alert", sorted(EXPECTED))
def test_each_rule_fires_for_the_failing_service_only(cluster, rules, alert):
    rule = rules[alert]
    assert _misfires(cluster, alert, rule["expr"], rule["for"]) == []


def test_the_error_ratio_is_the_share_of_failed_requests(cluster, rules):
    """The value behind the alert: 30 errors per 330 requests; a model without a single
    error has no ratio at all (one-to-one matching drops it), as in Prometheus."""
    expr = rules["MarrowScopeHighErrorRate"]["expr"].split(">")[0]
    values = {
        dict(k)["model"]: v for k, v in Evaluator(cluster.series).instant(expr, END_S).items()
    }
    assert values["celltype"] == pytest.approx(30 / 330)
    assert values["segmentation"] == pytest.approx(3 / 303)
    assert set(values) == {"celltype", "segmentation"}
    assert all(math.isfinite(v) for v in values.values())


MUTATIONS = [
    ("MarrowScopeHighErrorRate", ',status!="ok"', ""),  # every request counts as an error
    ("MarrowScopeHighErrorRate", 'status!="ok"', 'status="ok"'),
    ("MarrowScopeHighErrorRate", 'status!="ok"', 'status!="OK"'),  # a value never written
    ("MarrowScopeHighErrorRate", "> 0.05", "< 0.05"),
    ("MarrowScopeHighErrorRate", f'{{namespace="{NS}",status', "{status"),  # staging counts
    ("MarrowScopeHighErrorRate", "sum by (model)", "sum"),
    ("MarrowScopeHighP99Latency", "0.99", "0.5"),
    ("MarrowScopeHighP99Latency", "(model, le)", "(model)"),
    ("MarrowScopeHighP99Latency", "request_seconds", "queue_seconds"),
    ("MarrowScopeHighQueueTime", "> 0.5", "> 5"),
    ("MarrowScopeOversizedMessages", "> 0", "> 1"),
    ("MarrowScopeModelNotReady", "< 1", "< 0"),
    ("MarrowScopeModelNotReady", "-(celltype", "-(mlflow|celltype"),
    ("MarrowScopeModelVersionMissing", f'\nor absent(marrowscope_model_info{{namespace="{NS}",model="explain"}})', ""),
    ("MarrowScopeGatewayBacklog", "> 100", "> 200"),
    ("MarrowScopeGatewayRejections", '=~"4.."', '=~"[45].."'),
    ("MarrowScopeGatewayRejections", "> 0.2", "> 0.05"),
    ("MarrowScopeGatewaySweepFailing", ">= 2", ">= 3"),
    ("MarrowScopeGatewaySweepFailing", f'{{namespace="{NS}",condition', "{condition"),  # staging
    ("MarrowScopeHl7ListenerDown", "< 1", "< 0"),
    ("MarrowScopeHl7ListenerDown", 'deployment="marrowscope-hl7"', 'deployment="marrowscope-npm1"'),
    ("MarrowScopeHl7Nacks", ',ack!="AA"', ""),  # every answer counts as a NACK
    ("MarrowScopeHl7Nacks", "> 0.1", "> 0.5"),  # ORM^O01's 30 % no longer fires
    ("MarrowScopeHl7Nacks", "> 0.1", "> 0.02"),  # OML^O33's 5 % fires too
    ("MarrowScopeHl7Nacks", "sum by (type)", "sum"),
    ("MarrowScopeHl7Nacks", f'{{namespace="{NS}",ack', "{ack"),  # staging counts
    ("MarrowScopeHl7ConnectionsDropped", "framing|", ""),
    ("MarrowScopeHl7ConnectionsDropped", '=~"framing', '=~"peer|idle|framing'),
    ("MarrowScopeHl7ConnectionsDropped", f'{{namespace="{NS}",reason', "{reason"),
]  # fmt: skip


@pytest.mark.parametrize(("alert", "old", "new"), MUTATIONS)
def test_a_wrong_rule_fails_the_scenarios(cluster, rules, alert, old, new):
    rule = rules[alert]
    assert old in rule["expr"], (old, rule["expr"])
    mutated = rule["expr"].replace(old, new)
    assert _misfires(cluster, alert, mutated, rule["for"]) != [], mutated


@pytest.mark.parametrize(
    ("outcome", "fires"),
    [
        ({"sweep-1": False, "sweep-2": False}, True),
        ({"sweep-1": False, "sweep-2": False, "sweep-3": False}, True),
        # one failure among successes is not "repeatedly"; a condition="false" series is
        # 1 for every success, so this also catches a rule that drops condition="true"
        ({"sweep-1": False, "sweep-2": True, "sweep-3": True}, False),
        # failed Jobs that are not the CronJob's: a training Job, a manual run
        ({"sweep-1": False, "marrowscope-train-npm1": False}, False),
        ({"sweep-1": False, "marrowscope-gateway-sweep-manual": False}, False),
        ({}, False),
    ],
)
def test_the_sweep_alert_wants_repeated_failures_of_the_sweeps_jobs(rules, outcome, fires):
    rule = rules["MarrowScopeGatewaySweepFailing"]
    series = Series()
    _jobs(series, NS, outcome)
    fired = Evaluator(series).fires(rule["expr"], END_S, _seconds(rule["for"]))
    assert bool(fired) is fires, fired


def test_a_condition_shorter_than_for_does_not_fire(cluster, rules):
    """The backlog starts 30 min before the end: with `for: 15m` it fires; judged 22 min
    after the start (12 min of backlog) it does not yet."""
    rule = rules["MarrowScopeGatewayBacklog"]
    ev = Evaluator(cluster.series)
    assert ev.fires(rule["expr"], 22 * 60.0, _seconds(rule["for"])) == []
    assert ev.fires(rule["expr"], 26 * 60.0, _seconds(rule["for"])) != []


def test_the_evaluator_follows_prometheus_on_known_values():
    from tests.deploy.promql import _quantile, _rate

    buckets = [(0.1, 50.0), (0.5, 90.0), (math.inf, 100.0)]
    assert _quantile(0.5, list(buckets)) == pytest.approx(0.1)
    assert _quantile(0.7, list(buckets)) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert _quantile(0.95, list(buckets)) == pytest.approx(0.5)  # +Inf bucket: its lower bound
    assert math.isnan(_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    # a counter reset (a restarted pod) is not a negative rate
    assert _rate([(0.0, 100.0), (30.0, 130.0), (60.0, 10.0)]) == pytest.approx(40 / 60)
    with pytest.raises(PromQLError):
        Evaluator(Series()).instant("avg(x)", 0.0)
