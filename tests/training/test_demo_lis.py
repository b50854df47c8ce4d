"""`make demo`'s LIS output (training/demo_lis.py) for a small analysis the in-process gateway
finished with its fake model clients: the ORU^R01 is the outbox's, reads back strict as the
stored result, and points at the PDF written beside it, which is the gateway's own report."""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import func, select

from tests.gateway.conftest import files, meta, png, settings_env, wait_status
from tests.gateway.test_hl7_oru import _one, _parse

BASE = "http://127.0.0.1:8080"


@pytest.fixture
def finished(tmp_path):
    """(client with a LIS key, gateway services, analysis id, its result)."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.auth import create_key
    from services.gateway.config import GatewaySettings

    env = settings_env(tmp_path / "gw")
    app = create_app(GatewaySettings(**{k[11:].lower(): v for k, v in env.items()}))
    services = app.state.services
    with services.sessions.begin() as session:
        key = create_key(session, name="lis", scopes=["submit", "read"])[0]
    with TestClient(app, headers={"X-API-Key": key}) as client:
        r = client.post(
            "/v1/analyses",
            files=files(
                png(seed=5), metadata=meta(accession_id="DEMO-7", options={"explain": True})
            ),
        )
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], {})
        assert body["status"] == "succeeded", body
        yield client, services, body["id"], body["result"]


def test_oru_and_pdf_of_a_finished_analysis(finished, tmp_path):
    from services.gateway.db import Hl7Outbox
    from training.demo_lis import DEMO_LIS, oru_and_pdf

    client, services, aid, result = finished
    folder = tmp_path / "out" / "case-7"
    oru, pdf = oru_and_pdf(
        client, services.sessions, services.blobs, analysis_id=aid, folder=folder, base_url=BASE
    )

    got = _parse(oru)
    msh = got["msg"].msh
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert (msh.msh_5.to_er7(), msh.msh_6.to_er7()) == (
        DEMO_LIS.receiving_application,
        DEMO_LIS.receiving_facility,
    )
    assert got["order"].obr.obr_25.value == "P"  # preliminary: nobody signed it out
    assert float(_one(got, "p-aml")[1][0]) == pytest.approx(result["p_aml"])
    assert int(_one(got, "counted-cells")[1][0]) == result["n_cells_counted"]
    _, ref, *_ = _one(got, "report-pdf")
    assert ref[0] == f"{BASE}/v1/analyses/{aid}/report?format=pdf"
    assert (folder / "oru.hl7").read_text().splitlines() == oru.split("\r")

    assert pdf == folder / "report.pdf" and pdf.read_bytes().startswith(b"%PDF-")
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
    pages = int(next(ln.split()[-1] for ln in info.stdout.splitlines() if ln.startswith("Pages:")))
    assert 1 <= pages <= 2
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "DEMO-7" in text and f"{result['p_aml']:.3f}" in text
    # rendered, not sent: the demo has no HL7 destination and leaves no outbox row
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Hl7Outbox)) == 0


def test_an_unknown_analysis_writes_nothing(finished, tmp_path):
    from training.demo_lis import oru_and_pdf

    client, services, _, _ = finished
    # raise_for_status's error (the test client's httpx flavour names its own class)
    with pytest.raises(Exception, match="404 Not Found"):
        oru_and_pdf(
            client,
            services.sessions,
            services.blobs,
            analysis_id="0" * 32,
            folder=tmp_path / "none",
            base_url=BASE,
        )
    assert not (tmp_path / "none").exists()
