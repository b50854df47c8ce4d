"""Pixel size vs the unit the ensemble learned: P(AML) is withheld, never computed from
features in another unit, and the rest of the report still comes back."""

from __future__ import annotations

import pytest

from services.gateway.clients import FeatureUnits
from services.gateway.units import aml_abstention, case_unit, resolve_pixel_size
from tests.gateway.conftest import files, meta, png, wait_status

UM = FeatureUnits("um", 0.25, 0.3)
FIELD = (320, 240)
"""Images measured in um must be real fields of view (>= 20 um, cells 4-50 um across):
at 0.27 um/px the fakes' 30 px cells are 8 um, the image 65 um high."""


def _submit(client, keys, image: bytes, **options):
    return client.post(
        "/v1/analyses", files=files(image, metadata=meta(options=options)), headers=keys["lis"]
    ).json()["id"]


def _fhir_observations(client, aid, keys) -> dict[str, dict]:
    bundle = client.get(
        f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=keys["lis"]
    )
    assert bundle.status_code == 200
    return {
        e["resource"]["code"]["coding"][0]["code"]: e["resource"]
        for e in bundle.json()["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }


def test_um_ensemble_withholds_p_aml_without_pixel_size_and_keeps_the_rest(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_FEATURE_UNITS", "um")
    client, services, keys = gateway()
    with client:
        bare = wait_status(client.get, _submit(client, keys, png(seed=3)), keys["lis"])
        sized = wait_status(
            client.get, _submit(client, keys, png(*FIELD, seed=4), um_per_px=0.27), keys["lis"]
        )
        observations = _fhir_observations(client, bare["id"], keys)
        overlay = client.get(f"/v1/analyses/{bare['id']}/images/0/overlay.png", headers=keys["lis"])
        metrics = client.get("/metrics").text

    assert bare["status"] == "succeeded", bare
    res = bare["result"]
    assert res["schema_version"] == "1.9"
    assert res["p_aml"] is None and res["aml_positive"] is None
    assert res["aml"]["status"] == "abstained" and res["aml"]["reason"] == "pixel_size_required"
    assert res["aml"]["model_length_unit"] == "um"
    assert "options.um_per_px" in res["aml"]["detail"] and "0.25-0.3 um/px" in res["aml"]["detail"]
    assert bare["reason"].startswith("P(AML) withheld (pixel_size_required)")
    assert res["morphometrics_unit"] == "px"
    assert (res["images"][0]["um_per_px"], res["images"][0]["um_per_px_source"]) == (None, "none")
    # everything else is reported
    assert 0 <= res["p_npm1"] <= 1 and res["n_cells_counted"] > 0 and res["differential"]
    assert res["morphometrics"] and overlay.status_code == 200
    aml_obs = observations["p-aml"]
    assert "valueQuantity" not in aml_obs
    assert {c["code"] for c in aml_obs["dataAbsentReason"]["coding"]} == {
        "not-performed",
        "pixel_size_required",
    }
    assert "valueQuantity" in observations["p-npm1-mutated"]
    assert 'marrowscope_gateway_aml_abstained_total{reason="pixel_size_required"} 1.0' in metrics

    assert sized["status"] == "succeeded" and sized["reason"] is None
    res = sized["result"]
    assert 0 <= res["p_aml"] <= 1 and res["aml_positive"] is not None
    assert res["aml"] == {
        "status": "predicted",
        "reason": None,
        "detail": None,
        "model_length_unit": "um",
    }
    assert res["morphometrics_unit"] == "um"
    assert (res["images"][0]["um_per_px"], res["images"][0]["um_per_px_source"]) == (
        0.27,
        "request",
    )
    assert services.clients.seen_um_per_px == [None, 0.27]


def test_deployment_default_pixel_size_is_used_and_reported(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_FEATURE_UNITS", "um")
    client, services, keys = gateway(default_um_per_px="0.3")
    with client:
        body = wait_status(client.get, _submit(client, keys, png(*FIELD, seed=5)), keys["lis"])
        given = wait_status(
            client.get, _submit(client, keys, png(*FIELD, seed=6), um_per_px=0.2), keys["lis"]
        )
    res = body["result"]
    assert body["status"] == "succeeded" and 0 <= res["p_aml"] <= 1
    assert res["aml"]["status"] == "predicted" and res["morphometrics_unit"] == "um"
    assert res["images"][0]["um_per_px_source"] == "deployment_default"
    # the request's own value wins over the default
    assert given["result"]["images"][0]["um_per_px_source"] == "request"
    assert services.clients.seen_um_per_px == [0.3, 0.2]


def test_unknown_units_of_an_old_ensemble_are_trusted(gateway):
    client, _, keys = gateway()  # the fake ensemble reports no units by default
    with client:
        body = wait_status(client.get, _submit(client, keys, png(seed=7)), keys["lis"])
    res = body["result"]
    assert body["status"] == "succeeded" and 0 <= res["p_aml"] <= 1
    assert res["aml"]["status"] == "predicted" and res["aml"]["model_length_unit"] == "unknown"


@pytest.mark.parametrize(
    ("features", "model", "reason"),
    [
        ("px", UM, "pixel_size_required"),
        ("um", FeatureUnits("px"), "pixel_size_unexpected"),
        ("mixed", FeatureUnits(), "pixel_size_mixed"),
        ("mixed", UM, "pixel_size_mixed"),
        ("um", UM, None),
        ("px", FeatureUnits("px"), None),
        ("px", FeatureUnits(), None),
        ("um", FeatureUnits(), None),
    ],
)
def test_aml_abstention_rules(features, model, reason):
    got = aml_abstention(features, model, ensemble_version="4")
    assert (None if got is None else got["reason"]) == reason


def test_pixel_size_resolution_and_case_unit():
    assert resolve_pixel_size(0.2, 0.3) == (0.2, "request")
    assert resolve_pixel_size(None, 0.3) == (0.3, "deployment_default")
    assert resolve_pixel_size(None, None) == (None, "none")
    assert case_unit(["um", "um"]) == "um" and case_unit(["px"]) == "px"
    assert case_unit(["um", "px"]) == "mixed"


def test_results_stored_as_schema_1_0_still_validate():
    from services.gateway.result import AnalysisResult

    old = {
        "schema_version": "1.0",
        "analysis_id": "a",
        "outcome": "succeeded",
        "p_aml": 0.2,
        "aml_threshold": 0.5,
        "npm1_threshold": 0.5,
        "n_images": 1,
        "n_cells_detected": 0,
        "n_cells_counted": 0,
        "differential": [],
        "model_versions": {},
        "images": [],
        "generated_at": "2024-01-01T00:00:00+00:00",
    }
    parsed = AnalysisResult.model_validate(old)
    assert parsed.schema_version == "1.0" and parsed.aml is None
