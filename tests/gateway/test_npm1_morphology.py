"""NPM1 by morphology (result `npm1_morphology`): the ensemble's P(NPM1 mutated | AML) next
to the whole-image `p_npm1`, withheld whenever P(AML) is, not_available for an AML-only
ensemble."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from services.gateway.pipeline import CaseImage, Pipeline
from tests.gateway.conftest import files, meta, png, wait_status
from tests.gateway.fakes import FakeModelClients

TWO_TARGETS = {"MS_TEST_FAKE_ENSEMBLE_TARGETS": "aml,npm1", "MS_TEST_FAKE_FEATURE_UNITS": "um"}


def _setenv(monkeypatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _analyse(client, keys, image: bytes, **options) -> dict:
    aid = client.post(
        "/v1/analyses", files=files(image, metadata=meta(options=options)), headers=keys["lis"]
    ).json()["id"]
    return wait_status(client.get, aid, keys["lis"])


def _fhir(client, aid, keys) -> tuple[dict[str, dict], str]:
    """(Observations by code, the DiagnosticReport's conclusion)."""
    bundle = client.get(
        f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=keys["lis"]
    )
    assert bundle.status_code == 200, bundle.text
    resources = [e["resource"] for e in bundle.json()["entry"]]
    (report,) = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    return (
        {
            r["code"]["coding"][0]["code"]: r
            for r in resources
            if r["resourceType"] == "Observation"
        },
        report["conclusion"],
    )


def _fake_p_npm1(result: dict) -> float:
    """What the fake ensemble's NPM1 head answers for this case (see fakes.py)."""
    frac_bla = next((d["fraction"] for d in result["differential"] if d["code"] == "BLA"), 0.0)
    return 1 / (1 + math.exp(-8 * (frac_bla - 0.35)))


def test_two_target_ensemble_predicts_npm1_by_morphology_beside_the_image_call(
    gateway, monkeypatch
):
    _setenv(monkeypatch, **TWO_TARGETS, MS_TEST_FAKE_NPM1_THRESHOLD="0.3")
    client, _, keys = gateway(npm1_threshold="0.6")
    with client:
        body = _analyse(client, keys, png(320, 240, seed=11), um_per_px=0.27)
        observations, conclusion = _fhir(client, body["id"], keys)
        metrics = client.get("/metrics").text
        schema = client.get("/v1/schemas/result").json()

    assert body["status"] == "succeeded" and body["reason"] is None, body
    res = body["result"]
    assert res["schema_version"] == "1.9" and res["aml"]["status"] == "predicted"
    call = res["npm1_morphology"]
    assert call["status"] == "predicted" and call["reason"] is None
    assert call["p"] == pytest.approx(_fake_p_npm1(res), abs=1e-6)
    assert call["p"] != pytest.approx(res["p_aml"])
    # the model's recorded threshold, not the gateway's
    assert (call["threshold"], call["threshold_source"]) == (0.3, "model")
    assert call["positive"] == (call["p"] >= 0.3) and call["model_version"] == "2"
    # the whole-image NPM1 call keeps its fields and meaning (gateway threshold, image mean)
    per_image = [im["p_npm1"] for im in res["images"]]
    assert res["p_npm1"] == pytest.approx(sum(per_image) / len(per_image))
    assert res["npm1_threshold"] == 0.6 and res["npm1_positive"] == (res["p_npm1"] >= 0.6)

    morph = observations["p-npm1-morphology"]
    assert morph["valueQuantity"]["value"] == round(call["p"], 6)
    assert morph["interpretation"][0]["coding"][0]["code"] == ("POS" if call["positive"] else "NEG")
    assert "dataAbsentReason" not in morph
    assert observations["p-npm1-mutated"]["valueQuantity"]["value"] == round(res["p_npm1"], 6)
    assert f"P(NPM1 mutated | AML) by morphology {call['p']:.3f}" in conclusion
    assert 'marrowscope_gateway_npm1_morphology_total{status="predicted"} 1.0' in metrics
    assert "npm1_morphology" in schema["properties"]


def test_morphology_call_is_withheld_with_p_aml_for_the_pixel_size(gateway, monkeypatch):
    """Same features as P(AML): px morphometrics fed to a um ensemble mean nothing for NPM1
    either, although the ensemble answered P_NPM1."""
    _setenv(monkeypatch, **TWO_TARGETS)
    client, services, keys = gateway()
    with client:
        body = _analyse(client, keys, png(seed=11))
        observations, conclusion = _fhir(client, body["id"], keys)
        metrics = client.get("/metrics").text

    assert body["status"] == "succeeded", body
    res = body["result"]
    assert services.clients.calls["ensemble"] == 1
    assert res["aml"]["reason"] == "pixel_size_required" and res["p_aml"] is None
    call = res["npm1_morphology"]
    assert call["status"] == "abstained" and call["reason"] == "pixel_size_required"
    assert call["p"] is None and call["positive"] is None
    assert call["detail"] == res["aml"]["detail"]
    assert 0 <= res["p_npm1"] <= 1  # the whole-image call does not read morphometrics
    morph = observations["p-npm1-morphology"]
    assert "valueQuantity" not in morph
    assert {c["code"] for c in morph["dataAbsentReason"]["coding"]} == {
        "not-performed",
        "pixel_size_required",
    }
    assert "NPM1 by morphology withheld" in conclusion
    assert 'marrowscope_gateway_npm1_morphology_total{status="abstained"} 1.0' in metrics


@pytest.mark.parametrize(
    ("targets", "status", "reason"),
    [
        ("aml,npm1", "abstained", "too_few_cells"),
        ("aml", "not_available", "no_npm1_output"),
    ],
)
def test_too_few_cells(gateway, monkeypatch, targets, status, reason):
    """The ensemble is not called; its pinned metadata says whether it has the head."""
    _setenv(monkeypatch, MS_TEST_FAKE_ENSEMBLE_TARGETS=targets, MS_TEST_FAKE_CELLS="8")
    client, services, keys = gateway()
    with client:
        body = _analyse(client, keys, png(seed=12))
        observations, _ = _fhir(client, body["id"], keys)
    assert body["status"] == "abstained", body
    call = body["result"]["npm1_morphology"]
    assert (call["status"], call["reason"], call["p"]) == (status, reason, None)
    assert (call["threshold"], call["threshold_source"]) == (0.5, "deployment")
    assert "ensemble" not in services.clients.calls
    assert "p-npm1-morphology" not in observations and "p-aml" not in observations


def test_aml_only_ensemble_reports_morphology_not_available(gateway):
    client, _, keys = gateway(npm1_threshold="0.7")
    with client:
        body = _analyse(client, keys, png(seed=13))
        observations, conclusion = _fhir(client, body["id"], keys)
        metrics = client.get("/metrics").text
    res = body["result"]
    assert body["status"] == "succeeded" and 0 <= res["p_aml"] <= 1
    assert res["npm1_morphology"] == {
        "status": "not_available",
        "p": None,
        "positive": None,
        "threshold": 0.7,
        "threshold_source": "deployment",
        "reason": "no_npm1_output",
        "detail": "ensemble version 2 has no NPM1 output (trained for AML only)",
        "model_version": "2",
        "model": "ensemble",
    }
    assert "p-npm1-morphology" not in observations and "p-npm1-mutated" in observations
    assert "morphology" not in conclusion
    assert 'marrowscope_gateway_npm1_morphology_total{status="not_available"} 1.0' in metrics


class _Answering(FakeModelClients):
    """The fake ensemble with some of its answer replaced."""

    def __init__(self, **replace) -> None:
        super().__init__(targets=("aml", "npm1"))
        self.replace = replace

    async def ensemble(self, *args, **kwargs):
        return dataclasses.replace(await super().ensemble(*args, **kwargs), **self.replace)


def _run(clients, settings) -> object:
    return asyncio.run(
        Pipeline(clients=clients, settings=settings).run(
            analysis_id="a", images=[CaseImage(0, "0" * 64, png(seed=14))]
        )
    )


def test_without_a_model_threshold_the_gateway_setting_decides(make_settings):
    out = _run(FakeModelClients(targets=("aml", "npm1")), make_settings(npm1_threshold=0.9))
    call = out.result["npm1_morphology"]
    assert out.status == "succeeded" and call["status"] == "predicted"
    assert (call["threshold"], call["threshold_source"]) == (0.9, "deployment")
    assert call["positive"] == (call["p"] >= 0.9)


@pytest.mark.parametrize(
    ("replace", "what"),
    [
        ({"p_targets": {"npm1": 1.5}}, "P(NPM1) 1.5"),
        ({"p_targets": {"npm1": float("nan")}}, "P(NPM1) nan"),
        ({"thresholds": {"npm1": -0.1}}, "NPM1 threshold -0.1"),
    ],
)
def test_an_invalid_npm1_answer_fails_the_analysis(make_settings, replace, what):
    out = _run(_Answering(**replace), make_settings())
    assert out.status == "failed" and out.reason == f"ensemble returned an invalid {what}"


def test_results_stored_as_schema_1_1_still_validate():
    from pydantic import ValidationError

    from services.gateway.result import AnalysisResult

    stored = {
        "schema_version": "1.1",
        "analysis_id": "a",
        "outcome": "succeeded",
        "p_aml": 0.2,
        "aml": {"status": "predicted", "model_length_unit": "um"},
        "aml_threshold": 0.5,
        "p_npm1": 0.4,
        "npm1_threshold": 0.5,
        "npm1_positive": False,
        "n_images": 1,
        "n_cells_detected": 0,
        "n_cells_counted": 0,
        "differential": [],
        "model_versions": {},
        "images": [],
        "morphometrics_unit": "um",
        "generated_at": "2024-01-01T00:00:00+00:00",
    }
    parsed = AnalysisResult.model_validate(stored)
    assert parsed.schema_version == "1.1" and parsed.npm1_morphology is None
    with pytest.raises(ValidationError, match="npm1_morphology"):
        AnalysisResult.model_validate(
            {
                **stored,
                "schema_version": "1.2",
                "npm1_morphology": {
                    "status": "guessed",
                    "threshold": 0.5,
                    "threshold_source": "model",
                    "model_version": "2",
                    "model": "ensemble",
                },
            }
        )


@pytest.mark.parametrize(
    ("p_aml", "status"), [(0.2, "not_applicable"), (0.5, "predicted"), (0.97, "predicted")]
)
def test_a_case_called_non_aml_gets_no_npm1_morphology_probability(make_settings, p_aml, status):
    """The head learned P(NPM1 | AML) on AML cases only; on a control (no blasts) its answer
    is an extrapolation (the demo's control read 100 %), so it is not reported."""
    out = _run(_Answering(p_aml=p_aml, p_targets={"npm1": 0.99}), make_settings(aml_threshold=0.5))
    call = out.result["npm1_morphology"]
    assert out.status == "succeeded" and out.result["p_aml"] == p_aml and call["status"] == status
    if status == "not_applicable":
        assert (call["p"], call["positive"], call["reason"]) == (None, None, "not_aml")
        assert "below the AML threshold 0.5" in call["detail"]
        from services.gateway.fhir import build_bundle

        bundle = build_bundle(
            analysis={"id": "a", "accession_id": "ACC-1", "finished_at": None}, result=out.report
        )
        (obs,) = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"
            and e["resource"]["code"]["coding"][0]["code"] == "p-npm1-morphology"
        ]
        assert "valueQuantity" not in obs
        assert [c["code"] for c in obs["dataAbsentReason"]["coding"]] == [
            "not-applicable",
            "not_aml",
        ]
    else:
        assert (call["p"], call["positive"], call["reason"]) == (0.99, True, None)
