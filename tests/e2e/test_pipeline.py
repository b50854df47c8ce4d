"""End to end: the five model services and the gateway as real processes, models from a real
MLflow server, the LIS flow over real HTTP.

Models are tiny and untrained: the segmentation score threshold is 0 so the detector still
proposes cells, which is enough to exercise every hop (decode, detect, crop, type, aggregate,
ensemble with lineage and its NPM1-by-morphology head, npm1, explain, reports). Accuracy is
measured elsewhere.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from services.stack import LocalStack
from tests import fixtures_mlflow
from tests.services.helpers import register

mlflow_server = fixtures_mlflow.mlflow_server
ALIAS = "e2e"
TERMINAL = {"succeeded", "failed", "abstained", "cancelled"}
UM_PER_PX = 0.27
UNITS = {"length": "um", "um_per_px": [UM_PER_PX, UM_PER_PX]}  # the ensemble learned um


def _png(seed: int, size=(160, 120)) -> bytes:
    from training.data.synth_cohort import SynthConfig, sample_cohort
    from training.data.synth_render import render_image

    config = SynthConfig(size=size, images_per_case=1)
    spec = sample_cohort(seed, 2, config)[0]
    image, _ = render_image(np.random.default_rng(seed), spec, config)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    versions = {}
    for kind in ("segmentation", "celltype", "npm1"):
        model_dir = fixtures_mlflow.make_tiny_model_dir(kind, root / kind)
        versions[kind] = register(mlflow_server, kind, model_dir, ALIAS)
    ensemble_dir = fixtures_mlflow.make_tiny_model_dir(
        "ensemble", root / "ensemble", feature_units=UNITS, targets=["aml", "npm1"]
    )
    versions["ensemble"] = register(
        mlflow_server,
        "ensemble",
        ensemble_dir,
        ALIAS,
        {"segmentation": versions["segmentation"], "celltype": versions["celltype"]},
    )
    env = {
        "MS_SEGMENTATION_SCORE_THRESHOLD": "0.0",
        "MS_GATEWAY_MIN_CELLS": "1",
        "MS_GATEWAY_CALL_ATTEMPTS": "2",
        "MS_GATEWAY_RETRY_INITIAL_S": "0.1",
        "MS_GATEWAY_DEADLINE_S": "120",
        "MARROWSCOPE_MODEL_CACHE": str(root / "cache"),
    }
    with LocalStack(
        workdir=root / "stack", tracking_uri=mlflow_server, alias=ALIAS, env=env
    ) as running:
        running.versions = versions
        yield running


@pytest.fixture(scope="module")
def api(stack):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.gateway.keys",
            "create",
            "--name",
            "e2e",
            "--scopes",
            "submit,read",
        ],
        env=stack.gateway_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=stack.gateway_url, headers={"X-API-Key": key}, timeout=60) as client:
        yield client


def _submit(
    api,
    accession: str,
    images: list[bytes],
    explain: bool = False,
    um_per_px: float | None = UM_PER_PX,
) -> httpx.Response:
    options = {"explain": explain, **({"um_per_px": um_per_px} if um_per_px else {})}
    return api.post(
        "/v1/analyses",
        files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
        data={"metadata": json.dumps({"accession_id": accession, "options": options})},
    )


def _wait(api, analysis_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = api.get(f"/v1/analyses/{analysis_id}").json()
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.3)
    raise AssertionError(f"analysis {analysis_id} not finished after {timeout_s} s: {body}")


def test_case_flows_through_every_service_with_pinned_versions(stack, api):
    response = _submit(api, "E2E-1", [_png(1), _png(2)], explain=True)
    assert response.status_code == 202, response.text
    body = _wait(api, response.json()["id"])
    assert body["status"] == "succeeded", (body["status"], body.get("reason"))
    result = body["result"]
    assert {
        k: v["version"] for k, v in result["model_versions"].items() if k != "explain"
    } == stack.versions
    assert result["lineage"] == {
        "segmentation": stack.versions["segmentation"],
        "celltype": stack.versions["celltype"],
    }
    assert 0.0 <= result["p_aml"] <= 1.0 and 0.0 <= result["p_npm1"] <= 1.0
    assert result["aml"]["status"] == "predicted" and result["morphometrics_unit"] == "um"
    # the ensemble's second output, P(NPM1 | AML), beside the whole-image p_npm1
    morph = result["npm1_morphology"]
    if result["aml_positive"]:
        assert morph["status"] == "predicted" and 0.0 <= morph["p"] <= 1.0
    else:  # P(NPM1 | AML) is not reported for a case called non-AML
        assert (morph["status"], morph["reason"], morph["p"]) == ("not_applicable", "not_aml", None)
    assert morph["model_version"] == stack.versions["ensemble"]
    assert morph["threshold_source"] == "deployment"  # the tiny model records no threshold
    assert result["n_images"] == 2 and result["n_cells_counted"] >= 1
    fractions = sum(d["fraction"] for d in result["differential"])
    assert fractions == pytest.approx(1.0, abs=1e-6)
    assert result["explained"] and any(
        c["importance"] is not None for im in result["images"] for c in im["cells"]
    )

    from fhir.resources.R4B.bundle import Bundle

    fhir = api.get(f"/v1/analyses/{body['id']}/report", params={"format": "fhir"})
    bundle = Bundle.model_validate_json(fhir.text)
    kinds = {e.resource.__resource_type__ for e in bundle.entry}
    assert {"DiagnosticReport", "Observation", "Device"} <= kinds
    (obs,) = [
        e.resource
        for e in bundle.entry
        if e.resource.__resource_type__ == "Observation"
        and e.resource.code.coding[0].code == "p-npm1-morphology"
    ]
    if morph["status"] == "predicted":
        assert float(obs.valueQuantity.value) == round(morph["p"], 6)
    else:
        assert obs.valueQuantity is None and obs.dataAbsentReason.coding[0].code == "not-applicable"
    for kind in ("overlay", "heatmap"):
        png = api.get(f"/v1/analyses/{body['id']}/images/0/{kind}.png")
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size == (160, 120)


def test_without_pixel_size_p_aml_is_withheld_and_the_rest_reported(api):
    """Segmentation measures in px, the ensemble says it learned um: no P(AML) from skewed
    features, everything else as usual (the units cross both real gRPC hops)."""
    response = _submit(api, "E2E-NOPX", [_png(4)], um_per_px=None)
    assert response.status_code == 202, response.text
    body = _wait(api, response.json()["id"])
    assert body["status"] == "succeeded", (body["status"], body.get("reason"))
    result = body["result"]
    assert result["p_aml"] is None and result["morphometrics_unit"] == "px"
    assert result["aml"]["reason"] == "pixel_size_required"
    assert result["aml"]["model_length_unit"] == "um"
    assert 0.0 <= result["p_npm1"] <= 1.0 and result["n_cells_counted"] >= 1
    morph = result["npm1_morphology"]  # same features as P(AML): withheld with it
    assert (morph["status"], morph["reason"], morph["p"]) == (
        "abstained",
        "pixel_size_required",
        None,
    )
    fhir = api.get(f"/v1/analyses/{body['id']}/report", params={"format": "fhir"}).json()
    (aml,) = [
        e["resource"]
        for e in fhir["entry"]
        if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "p-aml"
    ]
    assert (
        "valueQuantity" not in aml
        and aml["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    )


def test_bad_upload_is_refused_and_nothing_is_stored(api):
    response = _submit(api, "E2E-BAD", [b"\x89PNG\r\n\x1a\n truncated"])
    assert response.status_code in (400, 413, 415, 422)
    assert "error" in response.json()
    assert api.get("/v1/analyses", params={"accession": "E2E-BAD"}).json()["items"] == []


def test_killed_service_delays_analyses_until_it_is_restarted(stack, api):
    """Issue 14 item 1: the segmentation process is SIGKILLed for longer than the call
    retries span (2 attempts, 0.1 s apart); the queued analyses wait instead of failing and
    all succeed once it is back."""
    stack.kill("segmentation")
    ids = []
    for k in range(3):
        response = _submit(api, f"E2E-DOWN-{k}", [_png(3 + k)])
        assert response.status_code == 202
        ids.append(response.json()["id"])
    time.sleep(10)
    during = [api.get(f"/v1/analyses/{i}").json() for i in ids]
    assert [b["status"] for b in during] == ["queued"] * 3, during
    ready = httpx.get(f"{stack.gateway_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["models"]["segmentation"] is False
    stack.restart("segmentation")
    bodies = [_wait(api, i) for i in ids]
    assert [b["status"] for b in bodies] == ["succeeded"] * 3, [b["reason"] for b in bodies]
