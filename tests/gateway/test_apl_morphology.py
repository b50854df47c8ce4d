"""APL by morphology (result `apl_morphology`, schema 1.3): the ensemble's P(APL | AML) next to
P(NPM1 | AML), with the same rules (withheld with P(AML), not_applicable for a case called
non-AML, not_available for a version without the head) and its own threshold and FHIR
Observation `p-apl-morphology`."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from marrowscope.targets import genetic_targets
from services.gateway.pipeline import CaseImage, Pipeline
from tests.gateway.conftest import png
from tests.gateway.fakes import FakeModelClients
from tests.gateway.test_npm1_morphology import _analyse, _fhir, _setenv

THREE_TARGETS = {
    "MS_TEST_FAKE_ENSEMBLE_TARGETS": "aml,npm1,apl",
    "MS_TEST_FAKE_FEATURE_UNITS": "um",
}


def _fake_p_apl(result: dict) -> float:
    """What the fake ensemble's APL head answers for this case (see fakes.py)."""
    frac_bla = next((d["fraction"] for d in result["differential"] if d["code"] == "BLA"), 0.0)
    return 1 / (1 + math.exp(6 * (frac_bla - 0.35)))


def test_three_target_ensemble_reports_apl_beside_npm1(gateway, monkeypatch):
    _setenv(monkeypatch, **THREE_TARGETS, MS_TEST_FAKE_APL_THRESHOLD="0.05")
    client, _, keys = gateway(npm1_threshold="0.6")
    with client:
        body = _analyse(client, keys, png(320, 240, seed=11), um_per_px=0.27)
        observations, conclusion = _fhir(client, body["id"], keys)
        metrics = client.get("/metrics").text
        schema = client.get("/v1/schemas/result").json()

    assert body["status"] == "succeeded", body
    res = body["result"]
    assert res["schema_version"] == "1.9"
    apl, npm1 = res["apl_morphology"], res["npm1_morphology"]
    assert apl["status"] == npm1["status"] == "predicted"
    assert apl["p"] == pytest.approx(_fake_p_apl(res), abs=1e-6)
    assert apl["p"] != pytest.approx(npm1["p"])
    # its own threshold: the model's for APL, the deployment's for NPM1 (none recorded)
    assert (apl["threshold"], apl["threshold_source"]) == (0.05, "model")
    assert (npm1["threshold"], npm1["threshold_source"]) == (0.6, "deployment")
    assert apl["positive"] == (apl["p"] >= 0.05) and apl["model_version"] == "2"

    obs = observations["p-apl-morphology"]
    assert obs["valueQuantity"]["value"] == round(apl["p"], 6)
    assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if apl["positive"] else "NEG")
    assert "PML-RARA" in obs["code"]["coding"][0]["display"]
    assert "p-npm1-morphology" in observations
    assert f"P(APL | AML) by morphology {apl['p']:.3f}" in conclusion
    assert (
        'marrowscope_gateway_genetic_morphology_total{status="predicted",target="apl"} 1.0'
        in metrics
    )
    assert "apl_morphology" in schema["properties"]


def test_npm1_only_ensemble_reports_apl_not_available(gateway, monkeypatch):
    _setenv(monkeypatch, MS_TEST_FAKE_ENSEMBLE_TARGETS="aml,npm1", MS_TEST_FAKE_FEATURE_UNITS="um")
    client, _, keys = gateway(apl_threshold="0.4")
    with client:
        body = _analyse(client, keys, png(320, 240, seed=13), um_per_px=0.27)
        observations, conclusion = _fhir(client, body["id"], keys)
    res = body["result"]
    assert res["npm1_morphology"]["status"] == "predicted"
    assert res["apl_morphology"] == {
        "status": "not_available",
        "p": None,
        "positive": None,
        "threshold": 0.4,
        "threshold_source": "deployment",
        "reason": "no_apl_output",
        "detail": "ensemble version 2 has no APL output (no P_APL)",
        "model_version": "2",
        "model": "ensemble",
    }
    assert "p-apl-morphology" not in observations and "APL" not in conclusion


def test_too_few_cells_abstains_apl_with_the_case(gateway, monkeypatch):
    _setenv(monkeypatch, MS_TEST_FAKE_ENSEMBLE_TARGETS="aml,npm1,apl", MS_TEST_FAKE_CELLS="8")
    client, services, keys = gateway()
    with client:
        body = _analyse(client, keys, png(seed=12))
    assert body["status"] == "abstained", body
    call = body["result"]["apl_morphology"]
    assert (call["status"], call["reason"], call["p"]) == ("abstained", "too_few_cells", None)
    assert "ensemble" not in services.clients.calls


def test_apl_withheld_with_p_aml_for_the_pixel_size(gateway, monkeypatch):
    _setenv(monkeypatch, **THREE_TARGETS)
    client, _, keys = gateway()
    with client:
        body = _analyse(client, keys, png(seed=11))
        observations, conclusion = _fhir(client, body["id"], keys)
    call = body["result"]["apl_morphology"]
    assert (call["status"], call["reason"]) == ("abstained", "pixel_size_required")
    assert {c["code"] for c in observations["p-apl-morphology"]["dataAbsentReason"]["coding"]} == {
        "not-performed",
        "pixel_size_required",
    }
    assert "APL by morphology withheld" in conclusion


class _Answering(FakeModelClients):
    def __init__(self, **replace) -> None:
        super().__init__(targets=("aml", "npm1", "apl"))
        self.replace = replace

    async def ensemble(self, *args, **kwargs):
        return dataclasses.replace(await super().ensemble(*args, **kwargs), **self.replace)


def _run(clients, settings):
    return asyncio.run(
        Pipeline(clients=clients, settings=settings).run(
            analysis_id="a", images=[CaseImage(0, "0" * 64, png(seed=14))]
        )
    )


@pytest.mark.parametrize(("p_aml", "status"), [(0.2, "not_applicable"), (0.9, "predicted")])
def test_a_case_called_non_aml_gets_no_apl_probability(make_settings, p_aml, status):
    out = _run(
        _Answering(p_aml=p_aml, p_targets={"npm1": 0.1, "apl": 0.97}),
        make_settings(aml_threshold=0.5, apl_threshold=0.5),
    )
    call = out.result["apl_morphology"]
    assert out.status == "succeeded" and call["status"] == status
    assert out.result["npm1_morphology"]["status"] == status
    if status == "not_applicable":
        assert (call["p"], call["positive"], call["reason"]) == (None, None, "not_aml")
        assert "P(APL | AML) is reported only for cases called AML" in call["detail"]
        from services.gateway.fhir import build_bundle

        bundle = build_bundle(
            analysis={"id": "a", "accession_id": "ACC-1", "finished_at": None}, result=out.report
        )
        (obs,) = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"
            and e["resource"]["code"]["coding"][0]["code"] == "p-apl-morphology"
        ]
        assert "valueQuantity" not in obs
        assert [c["code"] for c in obs["dataAbsentReason"]["coding"]] == [
            "not-applicable",
            "not_aml",
        ]
    else:
        assert (call["p"], call["positive"]) == (0.97, True)


@pytest.mark.parametrize(
    ("replace", "what"),
    [
        ({"p_targets": {"apl": 1.2}}, "P(APL) 1.2"),
        ({"thresholds": {"apl": 7.0}}, "APL threshold 7.0"),
    ],
)
def test_an_invalid_apl_answer_fails_the_analysis(make_settings, replace, what):
    out = _run(_Answering(**replace), make_settings())
    assert out.status == "failed" and out.reason == f"ensemble returned an invalid {what}"


def test_every_registered_target_has_a_result_entry():
    """A genetic target needs its field in the versioned result schema (a minor bump)."""
    from services.gateway.result import AnalysisResult, GeneticMorphologyCall

    fields = AnalysisResult.model_fields
    for target in genetic_targets():
        assert fields[target.report_entry].annotation == GeneticMorphologyCall | None
