"""P(APL | AML) from the attention-MIL model (`MS_GATEWAY_APL_MODEL=mil`, result 1.5): the
pipeline asks celltype for every typed cell's embedding, calls the MIL model once per case
with them, reports its P(APL | AML) as `apl_morphology` (`model` mil) and its attention as
each cell's `attention` / `importance`; without a usable MIL model the APL entry is
not_available and the rest reports; with the default (`ensemble`) nothing changes."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from services.gateway.pipeline import CaseImage, Pipeline
from tests.gateway.conftest import png
from tests.gateway.fakes import EMB_D, MIL_VERSION, VERSIONS, FakeModelClients
from tests.gateway.test_npm1_morphology import _analyse, _fhir, _setenv

THREE = ("aml", "npm1", "apl")


def _run(clients, settings, images, *, input_kind="fields", explain=False):
    case = [CaseImage(i, f"{i:064x}", data, um_per_px=0.27) for i, data in enumerate(images)]
    return asyncio.run(
        Pipeline(clients=clients, settings=settings).run(
            analysis_id="a", images=case, input_kind=input_kind, explain=explain
        )
    )


def _fake_mil(bag: np.ndarray) -> tuple[float, np.ndarray]:
    """The fake MIL model's answer (fakes.py), recomputed here."""
    z = 8.0 * bag[:, 0]
    a = np.exp(z - z.max())
    a /= a.sum()
    return 1 / (1 + math.exp(-6.0 * (float(a @ bag[:, 0]) - 0.5))), a


def _typed(result: dict) -> list[dict]:
    return [c for im in result["images"] for c in im["cells"] if c["cell_type"] is not None]


def test_mil_reports_p_apl_and_attention_over_every_image(make_settings):
    clients = FakeModelClients(targets=THREE, feature_units="um", mil="match")
    images = [png(320, 240, seed=21), png(320, 240, seed=22)]
    out = _run(clients, make_settings(apl_model="mil", apl_threshold=0.4), images)
    assert out.status == "succeeded", out.reason
    res = out.result
    apl = res["apl_morphology"]
    # one MIL call for the case, with one embedding per typed cell of both images
    (bag,) = clients.mil_bags
    typed = _typed(res)
    assert bag.shape == (len(typed), EMB_D) and len(typed) == res["n_cells_detected"] - sum(
        c["cell_type"] is None for im in res["images"] for c in im["cells"]
    )
    assert {im["index"] for im in res["images"]} == {0, 1}
    assert clients.embedding_requests >= 2
    p, a = _fake_mil(bag)
    assert apl["status"] == "predicted" and apl["model"] == "mil"
    assert apl["p"] == pytest.approx(p, abs=1e-6)
    assert apl["model_version"] == MIL_VERSION and apl["threshold"] == 0.4
    assert apl["threshold_source"] == "deployment" and apl["positive"] == (p >= 0.4)
    # the ensemble still answers P(AML) and NPM1; its APL head is not what is reported
    assert res["aml"]["status"] == "predicted" and res["p_aml"] is not None
    assert res["npm1_morphology"]["model"] == "ensemble"
    assert res["model_versions"]["mil"] == {"model": "mil", "version": MIL_VERSION}
    # attention per typed cell, in case order, summing to 1; untyped detections have none
    weights = [c["attention"] for c in typed]
    np.testing.assert_allclose(weights, a, atol=1e-6)
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    assert [c["importance"] for c in typed] == weights
    assert res["importance_source"] == "mil_attention"
    untyped = [c for im in res["images"] for c in im["cells"] if c["cell_type"] is None]
    assert untyped and all(c["attention"] is None and c["importance"] is None for c in untyped)


def test_single_cell_case_attends_over_its_cells(make_settings):
    clients = FakeModelClients(targets=THREE, feature_units="um", mil="match")
    images = [png(40, 40, seed=s) for s in range(60)]
    out = _run(clients, make_settings(apl_model="mil"), images, input_kind="cells")
    assert out.status == "succeeded", out.reason
    (bag,) = clients.mil_bags
    assert bag.shape == (60, EMB_D)
    weights = [c["attention"] for c in _typed(out.result)]
    assert len(weights) == 60 and sum(weights) == pytest.approx(1.0, abs=1e-6)
    assert out.result["apl_morphology"]["model"] == "mil"


def test_explain_keeps_occlusion_importance_and_mil_attention_beside_it(make_settings):
    clients = FakeModelClients(targets=THREE, feature_units="um", mil="match")
    out = _run(clients, make_settings(apl_model="mil"), [png(320, 240, seed=23)], explain=True)
    assert out.status == "succeeded", out.reason
    res = out.result
    assert res["importance_source"] == "explain_occlusion"
    typed = _typed(res)
    assert sum(c["attention"] for c in typed) == pytest.approx(1.0, abs=1e-6)
    assert any(c["importance"] != c["attention"] for c in typed)


@pytest.mark.parametrize(
    ("mode", "reason", "says"),
    [
        ("none", "no_mil_model", "no MIL model is served"),
        ("other_celltype", "mil_lineage_mismatch", "pinned celltype is 5"),
        ("other_dim", "mil_lineage_mismatch", "reads 5-d cell embeddings"),
    ],
)
def test_without_a_usable_mil_model_apl_is_not_available_and_the_rest_reports(
    make_settings, mode, reason, says
):
    clients = FakeModelClients(targets=THREE, feature_units="um", mil=mode)
    out = _run(clients, make_settings(apl_model="mil"), [png(320, 240, seed=24)])
    assert out.status == "succeeded", out.reason
    res = out.result
    apl = res["apl_morphology"]
    assert (apl["status"], apl["reason"], apl["model"]) == ("not_available", reason, "mil")
    assert says in apl["detail"] and apl["p"] is None
    assert res["aml"]["status"] == "predicted" and res["p_aml"] is not None
    assert res["npm1_morphology"]["status"] == "predicted"
    assert all(c["attention"] is None for c in _typed(res))
    assert res["importance_source"] is None


def test_too_few_cells_abstains_the_mil_call_too(make_settings):
    clients = FakeModelClients(targets=THREE, feature_units="um", mil="match", cells=8)
    out = _run(clients, make_settings(apl_model="mil"), [png(320, 240, seed=25)])
    assert out.status == "abstained"
    apl = out.result["apl_morphology"]
    assert (apl["status"], apl["reason"], apl["model"]) == ("abstained", "too_few_cells", "mil")
    assert clients.mil_bags == []


def _stable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("generated_at", "stage_seconds")}


def test_default_ensemble_apl_is_unchanged_even_with_a_mil_model_served(make_settings):
    images = [png(320, 240, seed=26)]
    served = FakeModelClients(targets=THREE, feature_units="um", mil="match")
    absent = FakeModelClients(targets=THREE, feature_units="um", mil="none")
    with_mil = _run(served, make_settings(), images).result
    without = _run(absent, make_settings(), images).result
    assert _stable(with_mil) == _stable(without)
    # nothing asked of the MIL model; the ensemble head reports as before
    assert served.mil_bags == []
    # celltype's embeddings are asked for the domain check only
    quiet = FakeModelClients(targets=THREE, feature_units="um", mil="match")
    _run(quiet, make_settings(domain_check="off"), images)
    assert quiet.embedding_requests == 0 and quiet.mil_bags == []
    assert "mil" not in with_mil["model_versions"]
    apl = with_mil["apl_morphology"]
    assert apl["model"] == "ensemble" and apl["model_version"] == VERSIONS["ensemble"]
    assert all(c["attention"] is None and c["importance"] is None for c in _typed(with_mil))
    assert with_mil["importance_source"] is None


def test_mil_call_in_the_report_and_fhir_bundle(gateway, monkeypatch):
    _setenv(
        monkeypatch,
        MS_TEST_FAKE_ENSEMBLE_TARGETS="aml,npm1,apl",
        MS_TEST_FAKE_FEATURE_UNITS="um",
        MS_TEST_FAKE_MIL="match",
    )
    client, _, keys = gateway(apl_model="mil")
    with client:
        body = _analyse(client, keys, png(320, 240, seed=27), um_per_px=0.27)
        observations, conclusion = _fhir(client, body["id"], keys)
        schema = client.get("/v1/schemas/result").json()
    assert body["status"] == "succeeded", body
    res = body["result"]
    assert res["schema_version"] == "1.9"
    apl = res["apl_morphology"]
    assert apl["status"] == "predicted" and apl["model"] == "mil"
    obs = observations["p-apl-morphology"]
    assert obs["valueQuantity"]["value"] == round(apl["p"], 6)
    assert "attention MIL" in obs["method"]["text"]
    assert f"P(APL | AML) by morphology {apl['p']:.3f}" in conclusion
    assert "importance_source" in schema["properties"]
