"""The gateway's storage sweep CronJob (gateway.sweep): `python -m services.gateway.blobs
sweep` on the worker's stores, env and hardening, on a schedule, and alerted on."""

from __future__ import annotations

import pytest

from tests.deploy import checks
from tests.deploy.conftest import RELEASE, load_values, render_chart

SWEEP = f"{RELEASE}-gateway-sweep"
WORKER = f"{RELEASE}-gateway-worker"


def _with_sweep(values: dict, **sweep: object) -> dict:
    gateway = values.get("gateway", {})
    return {**values, "gateway": {**gateway, "sweep": {**gateway.get("sweep", {}), **sweep}}}


def _container(workload: dict) -> dict:
    (c,) = checks.pod_spec(workload)["containers"]
    return c


def _settings(container: dict, monkeypatch: pytest.MonkeyPatch):
    """The GatewaySettings the container's plain env builds (secrets are not read here)."""
    from services.gateway.config import GatewaySettings

    for e in container["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    return GatewaySettings(database_url="postgresql+psycopg://u@db/x")


def test_sweep_runs_on_the_workers_stores_env_and_hardening(chart_objects, monkeypatch):
    """Same claims at the same paths, the same job store secret, and the paths the
    settings read are the mounted volumes: a sweep on another path would delete nothing
    (or, on an empty image root, judge every blob unreferenced on a volume it never sees)."""
    _, objs = chart_objects
    cron = checks.by_kind(objs, "CronJob")[SWEEP]
    worker = checks.by_kind(objs, "Deployment")[WORKER]
    c, wc = _container(cron), _container(worker)
    assert c["command"] == ["python", "-m", "services.gateway.blobs", "sweep"]
    assert c["image"] == wc["image"]

    mounts = checks.claim_mounts(cron)
    assert mounts == {k: v for k, v in checks.claim_mounts(worker).items() if k in mounts}
    assert set(mounts) == {"images", "slide-cache"}
    settings = _settings(c, monkeypatch)
    assert str(settings.image_root) == mounts["images"][1]
    assert str(settings.slide_cache_dir) == mounts["slide-cache"][1]
    env, wenv = ({e["name"]: e for e in x["env"]} for x in (c, wc))
    for name in (
        "MS_GATEWAY_DATABASE_URL",
        "MS_GATEWAY_IMAGE_ROOT",
        "MS_GATEWAY_SLIDE_CACHE_DIR",
        "MS_GATEWAY_DATA_DIR",
        "HOME",
    ):
        assert env[name] == wenv[name], name
    assert "secretKeyRef" in env["MS_GATEWAY_DATABASE_URL"]["valueFrom"]
    # nothing the sweep does not need (the webhook key, model addresses)
    assert "MS_GATEWAY_WEBHOOK_SECRET" not in env

    pod, wpod = checks.pod_spec(cron), checks.pod_spec(worker)
    assert pod["securityContext"] == wpod["securityContext"]
    assert c["securityContext"] == wc["securityContext"]
    assert pod["serviceAccountName"] == wpod["serviceAccountName"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp == next(v for v in wpod["volumes"] if v["name"] == "tmp")
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]

    spec = cron["spec"]
    assert spec["schedule"] == "17 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert c["args"] == ["--grace-s=86400"]
    job = spec["jobTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert 0 < job["activeDeadlineSeconds"] < 3600  # below the hourly period


def test_schedule_grace_and_limits_land_in_the_spec():
    values = _with_sweep(
        load_values("values-prod.yaml"),
        schedule="*/30 * * * *",
        graceSeconds=7200,
        dryRun=True,
        activeDeadlineSeconds=1200,
        successfulJobsHistoryLimit=2,
        failedJobsHistoryLimit=5,
        ttlSecondsAfterFinished=172800,
    )
    cron = checks.by_kind(render_chart(values), "CronJob")[SWEEP]
    spec = cron["spec"]
    assert spec["schedule"] == "*/30 * * * *"
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (2, 5)
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 1200
    assert job["ttlSecondsAfterFinished"] == 172800
    assert _container(cron)["args"] == ["--grace-s=7200", "--dry-run"]


def test_the_args_are_what_the_sweep_command_accepts():
    from services.gateway.blobs import get_args_parser

    values = _with_sweep({}, graceSeconds=3600, dryRun=True)
    c = _container(checks.by_kind(render_chart(values), "CronJob")[SWEEP])
    args = get_args_parser().parse_args(c["command"][3:] + c["args"])
    assert (args.command, args.grace_s, args.dry_run) == ("sweep", 3600.0, True)


def test_the_workers_env_applies_under_the_sweeps_own(monkeypatch):
    """Upload and fetch TTLs an operator sets for the worker hold for the sweep too."""
    values = {
        "gateway": {
            "worker": {"env": {"MS_GATEWAY_SLIDE_UPLOAD_TTL_S": 7200, "MS_GATEWAY_EXAMPLE": "x"}},
            "sweep": {"env": {"MS_GATEWAY_SLIDE_FETCH_TTL_S": 10800, "MS_GATEWAY_EXAMPLE": "y"}},
        }
    }
    c = _container(checks.by_kind(render_chart(values), "CronJob")[SWEEP])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MS_GATEWAY_EXAMPLE"] == "y"
    settings = _settings(c, monkeypatch)
    assert (settings.slide_upload_ttl_s, settings.slide_fetch_ttl_s) == (7200, 10800)


def test_existing_claims_are_what_the_sweep_mounts():
    values = load_values("values-prod.yaml")
    values["gateway"] = {
        **values["gateway"],
        "imageStore": {"existingClaim": "lab-images", "mountPath": "/mnt/images"},
        "slideCache": {"existingClaim": "lab-slides", "mountPath": "/mnt/slides"},
    }
    cron = checks.by_kind(render_chart(values), "CronJob")[SWEEP]
    assert checks.claim_mounts(cron) == {
        "images": ("lab-images", "/mnt/images"),
        "slide-cache": ("lab-slides", "/mnt/slides"),
    }


@pytest.mark.parametrize("values_file", ["values.yaml", "values-prod.yaml"])
def test_disabled_removes_the_job_its_policy_and_its_alert(values_file):
    objs = render_chart(_with_sweep(load_values(values_file), enabled=False))
    assert not checks.by_kind(objs, "CronJob")
    assert SWEEP not in checks.by_kind(objs, "NetworkPolicy")
    for rule in checks.by_kind(objs, "PrometheusRule").values():
        alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
        assert "MarrowScopeGatewaySweepFailing" not in alerts


def test_sweep_pods_accept_no_ingress(prod_objects):
    policy = checks.by_kind(prod_objects, "NetworkPolicy")[SWEEP]
    labels = checks.pod_template(checks.by_kind(prod_objects, "CronJob")[SWEEP])["metadata"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert not policy["spec"].get("ingress")


def test_the_alert_counts_the_cronjobs_own_jobs(prod_objects):
    (rule,) = checks.by_kind(prod_objects, "PrometheusRule").values()
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    expr = alerts["MarrowScopeGatewaySweepFailing"]["expr"]
    assert f'job_name=~"{SWEEP}-[0-9]+"' in expr


def test_a_long_release_name_still_leaves_room_for_the_job_suffix():
    """A CronJob name over 52 characters is refused: its Jobs add -<minute> (11)."""
    objs = render_chart(_with_sweep({"fullnameOverride": "m" * 60}))
    (name,) = checks.by_kind(objs, "CronJob")
    assert len(name) <= 52


def test_fewer_kept_failures_than_the_alert_counts_is_refused():
    import helm_python

    values = _with_sweep(load_values("values-prod.yaml"), failedJobsHistoryLimit=1)
    with pytest.raises(helm_python.HelmRenderError, match="failedJobsHistoryLimit"):
        render_chart(values)


@pytest.mark.parametrize(
    ("sweep", "where"),
    [
        ({"schedule": 17}, "schedule"),
        ({"schedule": "hourly"}, "schedule"),
        ({"schedule": "17 * * *"}, "schedule"),
        ({"graceSeconds": -1}, "graceSeconds"),
        ({"graceSeconds": 30}, "graceSeconds"),  # the command refuses under 60
        ({"graceSeconds": "1d"}, "graceSeconds"),
        ({"ttlSecondsAfterFinished": 0}, "ttlSecondsAfterFinished"),
        ({"failedJobsHistoryLimit": -1}, "failedJobsHistoryLimit"),
        ({"enabled": "yes"}, "enabled"),
        ({"gracePeriod": 60}, "gracePeriod"),
    ],
)
def test_misspelt_or_invalid_sweep_values_fail_schema(sweep, where):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=where):
        render_chart(_with_sweep({}, **sweep))
