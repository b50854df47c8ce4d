"""The policy checks themselves fail on the violations they exist to catch."""

from __future__ import annotations

import copy
import functools

import pytest

from tests.deploy import checks
from tests.deploy.conftest import load_values, render_chart


@functools.cache
def _prod() -> tuple[dict, ...]:
    return tuple(render_chart(load_values("values-prod.yaml")))


def mutated(fn) -> list[dict]:
    objs = copy.deepcopy(list(_prod()))
    fn(objs)
    return objs


def npm1(objs):
    return next(
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "marrowscope-npm1"
    )


def drop_probe(objs):
    del npm1(objs)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]


def latest_tag(objs):
    npm1(objs)["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/x/y:latest"


def writable_root(objs):
    npm1(objs)["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"
    ] = False


def expose_model(objs):
    svc = next(
        o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "marrowscope-npm1"
    )
    svc["spec"]["type"] = "LoadBalancer"


def open_model_port(objs):
    pol = next(
        o
        for o in objs
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("model-services")
    )
    pol["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})


def no_policies(objs):
    objs[:] = [o for o in objs if o["kind"] != "NetworkPolicy"]


def bad_field(objs):
    npm1(objs)["spec"]["template"]["spec"]["containers"][0]["resource"] = {}


@pytest.mark.parametrize(
    ("mutate", "check"),
    [
        (drop_probe, checks.check_containers),
        (latest_tag, checks.check_containers),
        (writable_root, checks.check_containers),
        (expose_model, lambda o: checks.check_exposure(o, "marrowscope-gateway-api")),
        (open_model_port, lambda o: checks.check_exposure(o, "marrowscope-gateway-api")),
        (no_policies, lambda o: checks.check_exposure(o, "marrowscope-gateway-api")),
        (bad_field, checks.validate_all),
    ],
)
def test_check_catches_violation(mutate, check):
    check(list(_prod()))  # the unmodified render passes
    with pytest.raises(AssertionError):
        check(mutated(mutate))
