"""training/rollout.py against a real HTTP server that speaks the Deployment endpoints."""

from __future__ import annotations

import copy
import functools

import pytest

from marrowscope.errors import InvalidInput
from tests.deploy.conftest import NAMESPACE, render_chart
from tests.deploy.fake_apiserver import FakeApiServer
from training.rollout import RolloutError, rollout_model_services


@functools.cache
def _rendered() -> tuple[dict, ...]:
    return tuple(render_chart({}))


def chart_deployments(drop: tuple[str, ...] = ()) -> list[dict]:
    """The model-service Deployments exactly as the chart renders them (the recorded JSON)."""
    return [
        copy.deepcopy(d)
        for d in _rendered()
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("marrowscope.io/tier") == "model"
        and d["metadata"]["name"] not in drop
    ]


@pytest.fixture
def client_for():
    from kubernetes import client

    def make(server: FakeApiServer):
        cfg = client.Configuration()
        cfg.host = server.url
        return client.ApiClient(cfg)

    return make


def env_of(dep: dict, var: str) -> str | None:
    for c in dep["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] == var:
                return e.get("value")
    return None


def test_patch_bodies_pin_exact_versions_and_annotate(client_for):
    with FakeApiServer(chart_deployments()) as srv:
        results = rollout_model_services(
            {"segmentation": "3", "npm1": "7"}, namespace=NAMESPACE, api_client=client_for(srv)
        )
        patches = srv.patches()
    assert [(r.deployment, r.status) for r in results] == [
        ("marrowscope-segmentation", "patched"),
        ("marrowscope-npm1", "patched"),
        ("marrowscope-explain", "patched"),
    ]
    assert [p["path"].rsplit("/", 1)[-1] for p in patches] == [
        "marrowscope-segmentation",
        "marrowscope-npm1",
        "marrowscope-explain",
    ]
    assert all(p["content_type"] == "application/strategic-merge-patch+json" for p in patches)
    assert all("dryRun" not in p["query"] for p in patches)
    seg, npm1, explain = (p["body"]["spec"]["template"] for p in patches)
    assert seg == {
        "metadata": {"annotations": {"marrowscope.io/model-version": "3"}},
        "spec": {
            "containers": [
                {
                    "name": "segmentation",
                    "env": [
                        {
                            "name": "MS_SEGMENTATION_MODEL_URI",
                            "value": "models:/marrowscope-segmentation/3",
                        }
                    ],
                }
            ]
        },
    }
    assert npm1["spec"]["containers"][0]["env"] == [
        {"name": "MS_NPM1_MODEL_URI", "value": "models:/marrowscope-npm1/7"}
    ]
    # explain preloads the NPM1 model, so it follows npm1's version.
    assert explain["spec"]["containers"][0]["env"] == [
        {"name": "MS_EXPLAIN_MODEL_URI", "value": "models:/marrowscope-npm1/7"}
    ]
    assert results[0].previous_uri == "models:/marrowscope-segmentation@champion"
    stored = srv.deployments[(NAMESPACE, "marrowscope-segmentation")]
    assert env_of(stored, "MS_SEGMENTATION_MODEL_URI") == "models:/marrowscope-segmentation/3"
    assert stored["metadata"]["generation"] == 2


def test_second_rollout_to_same_version_sends_no_patch(client_for):
    with FakeApiServer(chart_deployments()) as srv:
        rollout_model_services({"celltype": "5"}, namespace=NAMESPACE, api_client=client_for(srv))
        again = rollout_model_services(
            {"celltype": "5"}, namespace=NAMESPACE, api_client=client_for(srv)
        )
        assert len(srv.patches()) == 1
    assert [r.status for r in again] == ["unchanged"]


def test_dry_run_uses_server_side_dry_run_and_persists_nothing(client_for):
    with FakeApiServer(chart_deployments()) as srv:
        results = rollout_model_services(
            {"ensemble": "2"}, namespace=NAMESPACE, api_client=client_for(srv), dry_run=True
        )
        (patch,) = srv.patches()
        stored = srv.deployments[(NAMESPACE, "marrowscope-ensemble")]
    assert patch["query"]["dryRun"] == ["All"]
    assert results[0].status == "dry-run"
    assert env_of(stored, "MS_ENSEMBLE_MODEL_URI") == "models:/marrowscope-ensemble@champion"


def test_wait_reads_status_until_all_replicas_updated(client_for):
    with FakeApiServer(chart_deployments(), lag=2) as srv:
        results = rollout_model_services(
            {"ensemble": "4"},
            namespace=NAMESPACE,
            api_client=client_for(srv),
            wait=True,
            timeout_s=10,
            poll_s=0.01,
        )
        gets = [r for r in srv.requests if r["method"] == "GET"]
    assert results[0].status == "complete"
    # one read before the patch, then polls until the status caught up (lag 2 -> 3 reads)
    assert len(gets) == 1 + 3


def test_wait_times_out_with_a_clear_error(client_for):
    with (
        FakeApiServer(chart_deployments(), lag=10_000) as srv,
        pytest.raises(RolloutError, match="not complete"),
    ):
        rollout_model_services(
            {"npm1": "9"},
            namespace=NAMESPACE,
            api_client=client_for(srv),
            wait=True,
            timeout_s=0.2,
            poll_s=0.01,
        )


def test_absent_explain_is_reported_but_missing_model_service_fails(client_for):
    deps = chart_deployments(drop=("marrowscope-explain", "marrowscope-celltype"))
    with FakeApiServer(deps) as srv:
        results = rollout_model_services(
            {"npm1": "1"}, namespace=NAMESPACE, api_client=client_for(srv)
        )
        assert [r.status for r in results] == ["patched", "absent"]
        with pytest.raises(RolloutError, match="marrowscope-celltype"):
            rollout_model_services(
                {"celltype": "1"}, namespace=NAMESPACE, api_client=client_for(srv)
            )


def test_refused_patch_raises(client_for):
    with (
        FakeApiServer(chart_deployments(), fail_patch={"marrowscope-npm1"}) as srv,
        pytest.raises(RolloutError, match="refused"),
    ):
        rollout_model_services({"npm1": "2"}, namespace=NAMESPACE, api_client=client_for(srv))


@pytest.mark.parametrize(
    "versions",
    [{"explain": "1"}, {"npm2": "1"}, {"npm1": ""}, {"npm1": "champion@x"}, {"npm1": "a/b"}],
)
def test_bad_input_is_rejected_before_any_request(versions, client_for):
    with FakeApiServer([]) as srv:
        with pytest.raises(InvalidInput):
            rollout_model_services(versions, namespace=NAMESPACE, api_client=client_for(srv))
        assert srv.requests == []


def test_custom_prefix_targets_other_release_names(client_for):
    deps = chart_deployments()
    for d in deps:
        d["metadata"]["name"] = d["metadata"]["name"].replace("marrowscope-", "lab-ms-")
    with FakeApiServer(deps) as srv:
        (res,) = rollout_model_services(
            {"ensemble": "3"},
            namespace=NAMESPACE,
            deployment_prefix="lab-ms-",
            api_client=client_for(srv),
        )
    assert res.deployment == "lab-ms-ensemble" and res.status == "patched"
