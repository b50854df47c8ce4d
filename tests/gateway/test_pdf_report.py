"""The PDF report read as a person reads it: poppler renders it (pdftoppm), its text says
what the result says (pdftotext), its images are there (pdfimages), its fonts are embedded
(pdffonts) and its XMP claims PDF/A-2b (pdfinfo -meta). Skipped without poppler-utils
(`make setup` installs it where apt is available)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.gateway.pdf import Figure, build_pdf
from services.gateway.reading import CaseHeader, SignOut
from services.gateway.render import heatmap_png, overlay_png
from tests.gateway.conftest import files, meta, png, wait_status
from tools.report_sample import synthetic_case, synthetic_heatmap, too_few_cells, withheld

pytestmark = pytest.mark.skipif(
    shutil.which("pdftoppm") is None, reason="poppler-utils (pdftoppm, pdftotext) not installed"
)
CASE = CaseHeader(
    analysis_id="a1",
    accession="ACC-<42>&",
    specimen_type="bone_marrow_aspirate",
    stain="MGG",
    finished_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
)


def _poppler(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _read(pdf: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "r.pdf"
    path.write_bytes(pdf)
    _poppler("pdftoppm", "-png", "-r", "30", str(path), str(tmp_path / "page"))
    return {
        "pages": sorted(tmp_path.glob("page-*.png")),
        "text": " ".join(_poppler("pdftotext", str(path), "-").split()),
        "images": _poppler("pdfimages", "-list", str(path)).splitlines()[2:],
        "fonts": _poppler("pdffonts", str(path)).splitlines()[2:],
        "xmp": _poppler("pdfinfo", "-meta", str(path)),
    }


@pytest.fixture(scope="module")
def case():
    image, result = synthetic_case(size=(320, 240))
    im = result.images[0]
    figure = Figure(
        im,
        overlay_png(image, im.cells),
        heatmap_png(image, synthetic_heatmap(result, image.shape[:2])),
    )
    return result, figure


def test_preliminary_report_reads_as_the_result(case, tmp_path):
    result, figure = case
    got = _read(build_pdf(case=CASE, result=result, figure=figure), tmp_path)
    text = got["text"]
    assert 1 <= len(got["pages"]) <= 2
    assert "AI-GENERATED, PRELIMINARY" in text
    assert "ACC-<42>&" in text  # escaped for the markup, printed as sent
    assert f"{result.p_aml:.3f} (positive" in text
    assert f"{result.npm1_morphology.p:.3f} (positive" in text
    assert f"{result.apl_morphology.p:.3f} (negative" in text
    assert "not a molecular test" in text and "PML-RARA" in text
    for d in result.differential:
        row = f"{d.code} {d.count} {100 * d.fraction:.1f} {100 * d.ci_low:.1f} - {100 * d.ci_high:.1f}"
        assert row in text, row
    assert f"{result.blast_percent:.1f} % of {result.n_cells_counted} counted cells" in text
    n_rbc = sum(1 for c in result.images[0].cells if c.detector_label == "RBC")
    assert f"Red blood cell {n_rbc}" in text
    for stage, v in result.model_versions.items():
        assert re.search(rf"{stage} {re.escape(v.version)}\b", text)
    assert "Reviewed by (hematologist)" in text
    # the overlay, the heatmap and its colour scale
    assert len(got["images"]) == 3
    assert all(line.split()[5] == "rgb" for line in got["images"])
    assert got["fonts"] and all(line.split()[-5] == "yes" for line in got["fonts"])
    assert "<pdfaid:part>2</pdfaid:part>" in got["xmp"]
    assert "<pdfaid:conformance>B</pdfaid:conformance>" in got["xmp"]


def test_signed_out_report_names_the_reviewer(case, tmp_path):
    result, _ = case
    sign_out = SignOut("Dr. A. Hemat", datetime(2026, 12, 8, 9, 30, tzinfo=UTC), "agree; AML")
    text = _read(build_pdf(case=CASE, result=result, sign_out=sign_out), tmp_path)["text"]
    assert "PRELIMINARY" not in text and "preliminary" not in text
    assert "Signed out by Dr. A. Hemat on 2026-12-08 09:30 UTC" in text
    assert "Comment: agree; AML" in text
    amended = SignOut("Dr. B", datetime(2026, 12, 9, tzinfo=UTC), amended=True)
    text = _read(build_pdf(case=CASE, result=result, sign_out=amended), tmp_path)["text"]
    assert "Amended by Dr. B" in text and "corrected" in text


def test_withheld_call_says_why(case, tmp_path):
    text = _read(build_pdf(case=CASE, result=withheld(case[0])), tmp_path)["text"]
    assert "withheld (pixel_size_required): send options.um_per_px" in text
    assert "withheld with P(AML) (pixel_size_required)" in text
    assert "not applicable: the case is called non-AML (not_aml)" in text


def test_abstained_case_is_one_page_with_the_reason(tmp_path):
    got = _read(build_pdf(case=CASE, result=too_few_cells()), tmp_path)
    assert len(got["pages"]) == 1 and got["images"] == []
    assert "no AI call: too few cells for a reliable call: 3 counted" in got["text"]


def test_pdf_endpoint_and_fhir_presented_form(gateway, tmp_path):
    client, _, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(png(seed=5), metadata=meta(options={"explain": True})),
            headers=keys["lis"],
        )
        aid = r.json()["id"]
        result = wait_status(client.get, aid, keys["lis"])["result"]
        rep = client.get(
            f"/v1/analyses/{aid}/report", params={"format": "pdf"}, headers=keys["lis"]
        )
        fhir = client.get(
            f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=keys["lis"]
        )
    assert rep.status_code == 200, rep.text
    assert rep.headers["content-type"] == "application/pdf"
    got = _read(rep.content, tmp_path)
    assert f"{result['p_aml']:.3f}" in got["text"]
    assert len(got["images"]) == 3  # overlay, heatmap, scale: the case was explained
    report = next(
        e["resource"]
        for e in fhir.json()["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    (form,) = report["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert base64.b64decode(form["data"]).startswith(b"%PDF-")


def test_domain_check_is_on_the_report(case, tmp_path):
    from services.gateway.result import DomainCheck

    result = case[0].model_copy(
        update={
            "domain": DomainCheck(
                status="out_of_domain",
                action="abstain",
                score=4.21,
                embedding=4.21,
                appearance=1.3,
                threshold=1.65,
                n_cells=41,
                celltype_version="5",
            )
        }
    )
    text = _read(build_pdf(case=CASE, result=result), tmp_path)["text"]
    assert "Domain check" in text and "OUT OF DOMAIN: score 4.21 (threshold 1.65) over 41" in text
    (tmp_path / "plain").mkdir()
    plain = _read(build_pdf(case=CASE, result=case[0]), tmp_path / "plain")["text"]
    assert ("Domain check" in plain) == (case[0].domain is not None)
