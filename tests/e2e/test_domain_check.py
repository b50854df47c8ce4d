"""The per-case domain check through the gateway (issue 23 §5): real segmentation and
celltype services on loopback ports (models from a real MLflow server; the typer's
directory carries a `domain.json` fitted on in-domain crops), the gateway app over HTTP
with its worker; ensemble and npm1 answer from the gateway's fakes.

A single-cell case of in-domain crops is predicted; the same cells recoloured far outside
the reference abstain with `out_of_domain` (P(AML) and the genetic calls), the differential
carries a warning, FHIR has the `domain-score` Observation, and the per-tenant counter
counts the case. A deployment with the check on `warn` predicts the same case but flags it.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from marrowscope.taxonomy import ATTRIBUTE_CODES, COUNTED_CODES
from tests import fixtures_mlflow
from tests.e2e.test_cells_case import _ServedCells
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.conftest import files, meta, wait_status
from tests.services import conftest as service_fixtures

gateway = gateway_fixtures.gateway
make_settings = gateway_fixtures.make_settings
mlflow_server = fixtures_mlflow.mlflow_server
start_service = service_fixtures.start_service
serve_registered = service_fixtures.serve_registered

ALIAS = "test-domain-check"
ADDRS_ENV = "MS_TEST_DOMAIN_ADDRS"
N_CELLS = 12


def _cells(n: int, seed: int, tint=(0, 0, 0)) -> list[np.ndarray]:
    """n 40 px single-cell images: a violet cell on a light background, tinted by `tint`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    out = []
    for _ in range(n):
        r = rng.uniform(9, 13)
        disk = (yy - 20 + rng.normal(0, 2)) ** 2 + (xx - 20 + rng.normal(0, 2)) ** 2 < r * r
        img = np.where(disk[..., None], rng.normal((110, 70, 150), 6, 3), (226, 214, 222))
        img = img + rng.normal(0, 5, img.shape) + np.array(tint)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def services(serve_registered, tmp_path_factory):
    """Served segmentation and a celltype version whose directory carries a calibrated
    domain reference of the in-domain look."""
    from marrowscope import case
    from marrowscope.inference import CellTyper
    from marrowscope.models import load_model
    from training.domain import calibrate, fit_reference, pseudo_cases, scores_of

    root = tmp_path_factory.mktemp("domain")
    seg = fixtures_mlflow.make_tiny_model_dir("segmentation", root / "seg")
    cel = fixtures_mlflow.make_tiny_model_dir(
        "celltype", root / "cel", outputs=[*COUNTED_CODES, *ATTRIBUTE_CODES]
    )
    typer = CellTyper(load_model(cel))
    crops = np.stack([case.single_cell_crop(im, typer.crop_size) for im in _cells(240, 0)])
    _, emb = typer.predict_with_embeddings(crops)
    reference = fit_reference(emb[:160], crops[:160], n_components=8)
    held = slice(160, None)
    cases = pseudo_cases(80, N_CELLS)
    threshold = calibrate(scores_of(reference.cell_scores(emb[held], crops[held]), cases), 0.0)
    reference.__class__(**{**reference.__dict__, "threshold": 1.5 * threshold}).save(cel)
    return {
        "segmentation": serve_registered("segmentation", seg, ALIAS),
        "celltype": serve_registered("celltype", cel, ALIAS),
    }


class _Hybrid(_ServedCells):
    """Real segmentation and celltype (test_cells_case's clients), the fakes' ensemble with
    the NPM1 and APL heads."""

    def __init__(self, oip) -> None:
        super().__init__(oip)
        self.targets = ("aml", "npm1", "apl")


def make_clients(settings):
    """The gateway's clients factory (MS_GATEWAY_CLIENTS_FACTORY) for this module."""
    from services.gateway.oip import OipModelClients

    return _Hybrid(OipModelClients(json.loads(os.environ[ADDRS_ENV])))


def _submit_and_wait(client, key, images: list[np.ndarray]) -> tuple[dict, dict]:
    r = client.post(
        "/v1/analyses",
        files=files(*[_png(im) for im in images], metadata=meta(input="cells")),
        headers=key,
    )
    assert r.status_code == 202, r.text
    aid = r.json()["id"]
    body = wait_status(client.get, aid, key, timeout=120)
    fhir = client.get(f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=key)
    assert fhir.status_code == 200, fhir.text
    observations = {
        e["resource"]["code"]["coding"][0]["code"]: e["resource"]
        for e in fhir.json()["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }
    conclusion = next(
        e["resource"]["conclusion"]
        for e in fhir.json()["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    return body, {"observations": observations, "conclusion": conclusion}


def _start(gateway, services, monkeypatch, **settings):
    from services.gateway.auth import create_key

    addrs = {s: services[s].address for s in ("segmentation", "celltype")}
    monkeypatch.setenv(ADDRS_ENV, json.dumps(addrs))
    client, state, keys = gateway(
        clients_factory=f"{__name__}:make_clients", min_cells="5", **settings
    )
    with state.sessions.begin() as session:
        key = {"X-API-Key": create_key(session, name="site-a", scopes=["submit", "read"], tenant="a")[0]}  # fmt: skip
    return client, key


def test_out_of_domain_case_abstains_and_is_counted_per_tenant(gateway, services, monkeypatch):
    client, key = _start(gateway, services, monkeypatch)
    with client:
        inside, inside_fhir = _submit_and_wait(client, key, _cells(N_CELLS, 1))
        outside, outside_fhir = _submit_and_wait(client, key, _cells(N_CELLS, 1, (-60, 30, -70)))
        metrics = client.get("/metrics").text
    assert inside["status"] == outside["status"] == "succeeded", (inside, outside)
    res = inside["result"]
    assert res["domain"]["status"] == "in_domain" and res["aml"]["status"] == "predicted"
    assert res["domain"]["score"] <= res["domain"]["threshold"] and res["p_aml"] is not None
    assert res["differential_warning"] is None
    assert res["npm1_morphology"]["reason"] != "out_of_domain"

    res = outside["result"]
    dom = res["domain"]
    assert dom["status"] == "out_of_domain" and dom["action"] == "abstain"
    assert dom["score"] > dom["threshold"] and dom["n_cells"] == N_CELLS
    assert dom["celltype_version"] == services["celltype"].version
    assert (res["aml"]["status"], res["aml"]["reason"]) == ("abstained", "out_of_domain")
    assert res["p_aml"] is None and res["aml_positive"] is None
    for entry in ("npm1_morphology", "apl_morphology"):
        assert (res[entry]["status"], res[entry]["reason"]) == ("abstained", "out_of_domain")
    assert "differential count may be wrong" in res["differential_warning"]
    assert sum(d["count"] for d in res["differential"]) == N_CELLS  # still reported

    obs = outside_fhir["observations"]["domain-score"]
    assert obs["interpretation"][0]["coding"][0]["code"] == "A"
    assert obs["valueQuantity"]["value"] == pytest.approx(dom["score"], abs=1e-5)
    assert "differential count may be wrong" in outside_fhir["conclusion"]
    assert "withheld (out_of_domain" in outside_fhir["conclusion"]
    inside_obs = inside_fhir["observations"]["domain-score"]
    assert inside_obs["interpretation"][0]["coding"][0]["code"] == "N"
    assert 'marrowscope_gateway_out_of_domain_cases_total{tenant="a"} 1.0' in metrics


def test_warn_only_flags_the_case(gateway, services, monkeypatch):
    client, key = _start(gateway, services, monkeypatch, domain_check="warn")
    with client:
        body, _ = _submit_and_wait(client, key, _cells(N_CELLS, 1, (-60, 30, -70)))
    res = body["result"]
    assert res["domain"]["status"] == "out_of_domain" and res["domain"]["action"] == "warn"
    assert res["aml"]["status"] == "predicted" and res["p_aml"] is not None
    assert res["differential_warning"]
