"""The ORU^R01 parses back with hl7apy (strict, v2.5.1) and its OBX values are the result's."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

import pytest

from services.gateway.hl7 import Hl7Options, build_oru
from services.gateway.hl7codes import CODING_SYSTEM, code_table
from services.gateway.reading import CaseHeader, SignOut
from tools.report_sample import synthetic_case, too_few_cells, withheld

CASE = CaseHeader(
    analysis_id="a1",
    accession="ACC|7^x&y",
    specimen_type="bone_marrow_aspirate",
    stain="MGG",
    finished_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
)
URL = "https://ms.example/v1/analyses/a1/report?format=pdf&k=1"


@pytest.fixture(scope="module")
def result():
    return synthetic_case(size=(480, 360), seed=3)[1]


def _unescape(text: str) -> str:
    """What a receiver does with the HL7 escapes (hl7apy leaves them in parsed values)."""
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    return re.sub(r"\\([FSTRE])\\", lambda m: table[m.group(1)], text)


def _parse(er7: str, strict: bool = True) -> dict:
    """{code: [(value type, OBX-5 components, OBX-8, OBX-11, [NTE texts])]} plus the header."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    level = VALIDATION_LEVEL.STRICT if strict else VALIDATION_LEVEL.TOLERANT
    msg = parse_message(er7, validation_level=level, find_groups=True)
    msg.validate()
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    obs: dict[str, list] = {}
    for group in order.oru_r01_observation:
        obx = group.obx
        # OBX-5 is `varies`: read its components by position (hl7apy 1.3.5 cannot name them)
        parts = [c.value for c in obx.obx_5.children] if obx.obx_5.children else []
        notes = [n.nte_3.value for n in group.children if n.name == "NTE"]
        obs.setdefault(obx.obx_3.ce_1.value, []).append(
            (obx.obx_2.value, parts, obx.obx_8.value, obx.obx_11.value, notes, obx.obx_3)
        )
    return {"msg": msg, "order": order, "obs": obs}


def _one(got: dict, name: str):
    (entry,) = got["obs"][name]
    return entry


def test_oru_values_are_the_results(result):
    er7 = build_oru(case=CASE, result=result, control_id="a1-1", pdf_url=URL)
    got = _parse(er7)
    msg, order = got["msg"], got["order"]
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msg.msh.msh_12.to_er7() == "2.5.1"
    # delimiters in the accession are escaped, and read back as sent
    assert _unescape(order.orc.orc_2.ei_1.value) == "ACC|7^x&y"
    assert _unescape(msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1.value) == "ACC|7^x&y"
    assert order.obr.obr_25.value == "P"
    assert order.obr.obr_4.ce_1.value == "marrowscope-analysis"

    vt, parts, flag, status, notes, _ = _one(got, "p-aml")
    assert (vt, float(parts[0]), flag, status) == ("NM", result.p_aml, "A", "P")
    assert _one(got, "aml-status")[1][0] == "predicted"
    for target_code, morph in (("npm1", result.npm1_morphology), ("apl", result.apl_morphology)):
        vt, parts, flag, status, notes, _ = _one(got, f"p-{target_code}-morphology")
        assert float(parts[0]) == pytest.approx(morph.p)
        assert flag == ("A" if morph.positive else "N")
        assert any("not a" in n for n in notes)  # the limits travel with the value
        assert _one(got, f"{target_code}-morphology-status")[1][0] == "predicted"
    assert float(_one(got, "blast-percent")[1][0]) == pytest.approx(result.blast_percent, abs=1e-4)
    for d in result.differential:
        assert int(_one(got, f"count-{d.code}")[1][0]) == d.count
        assert float(_one(got, f"percent-{d.code}")[1][0]) == pytest.approx(
            100 * d.fraction, abs=1e-4
        )
        _, sn, *_ = _one(got, f"ci95-{d.code}")
        assert sn[2] == "-"
        assert float(sn[1]) == pytest.approx(100 * d.ci_low, abs=1e-4)
        assert float(sn[3]) == pytest.approx(100 * d.ci_high, abs=1e-4)
    assert int(_one(got, "counted-cells")[1][0]) == result.n_cells_counted
    n_rbc = sum(1 for c in result.images[0].cells if c.detector_label == "RBC")
    assert int(_one(got, "noncounted-RBC")[1][0]) == n_rbc
    assert _one(got, "input-kind")[1][0] == "fields"
    for stage, v in result.model_versions.items():
        assert _one(got, f"model-version-{stage}")[1] == [v.version]
    vt, parts, *_ = _one(got, "report-pdf")
    assert vt == "RP" and _unescape(parts[0]) == URL and parts[2:] == ["AP", "PDF"]
    # every OBX carries a code of the one table, in the local coding system
    assert set(got["obs"]) <= set(code_table())
    assert all(e[5].ce_3.value == CODING_SYSTEM for es in got["obs"].values() for e in es)


def test_withheld_and_not_applicable_calls_say_why(result):
    got = _parse(build_oru(case=CASE, result=withheld(result), control_id="a1-2"))
    vt, parts, flag, status, *_ = _one(got, "p-aml")
    assert (parts, flag or None, status) == ([], None, "X")
    assert _one(got, "aml-status")[1][0] == "abstained"
    reason = _one(got, "aml-reason")
    detail = "send options.um_per_px"
    assert reason[1][:2] == ["pixel_size_required", detail] and reason[4] == [detail]
    assert _one(got, "p-apl-morphology")[3] == "N"
    assert _one(got, "apl-morphology-status")[1][0] == "not_applicable"
    assert _one(got, "apl-morphology-reason")[1][0] == "not_aml"
    assert "report-pdf" not in got["obs"]  # no URL given: left out, not sent empty


def test_abstained_case_sends_the_reason_code():
    got = _parse(build_oru(case=CASE, result=too_few_cells(), control_id="a1-5"))
    assert _one(got, "p-aml")[3] == "X"
    assert _one(got, "aml-status")[1][0] == "abstained"
    assert _one(got, "aml-reason")[1][0] == "too_few_cells"
    assert int(_one(got, "counted-cells")[1][0]) == 3
    assert not any(c.startswith("count-") for c in got["obs"])  # no differential to send


@pytest.mark.parametrize(("amended", "status"), [(False, "F"), (True, "C")])
def test_sign_out_sets_final_or_corrected(result, amended, status):
    sign_out = SignOut("Dr. A", datetime(2026, 12, 8, 9, 30, tzinfo=UTC), "agree", amended=amended)
    got = _parse(build_oru(case=CASE, result=result, control_id="a1-3", sign_out=sign_out))
    assert got["order"].obr.obr_25.value == status
    assert {e[3] for es in got["obs"].values() for e in es} == {status}
    notes = [n.nte_3.value for n in got["order"].children if n.name == "NTE"]
    assert any(n.startswith(("Signed out by Dr. A", "Amended by Dr. A")) for n in notes)


def test_embedded_pdf_and_site_codes(result):
    pdf = b"%PDF-1.4 not really " * 500
    options = Hl7Options(
        pdf="embed", site_codes={"blast-percent": ("SITE-BLAST", "Blasts % (AI)", "99SITE")}
    )
    got = _parse(
        build_oru(case=CASE, result=result, control_id="a1-4", options=options, pdf=pdf),
        strict=False,
    )
    vt, parts, *_ = _one(got, "report-pdf")
    assert vt == "ED" and parts[1:4] == ["AP", "PDF", "Base64"]
    assert base64.b64decode(parts[4]) == pdf
    # the site's code first, the local code as the alternate identifier
    ce = got["msg"].to_er7().split("\r")
    line = next(s for s in ce if "SITE-BLAST" in s)
    assert "|SITE-BLAST^Blasts % (AI)^99SITE^blast-percent^" in line


@pytest.mark.parametrize("status", ["in_domain", "out_of_domain", "not_available"])
def test_domain_check_is_an_obx(result, status):
    from services.gateway.result import DomainCheck

    scored = status != "not_available"
    check = DomainCheck(
        status=status,
        action="abstain",
        score=(2.5 if status == "out_of_domain" else 0.8) if scored else None,
        embedding=0.7 if scored else None,
        appearance=0.8 if scored else None,
        threshold=1.9 if scored else None,
        n_cells=120,
        reason=None if scored else "no_domain_reference",
        detail=None if scored else "the pinned typer carries no domain reference",
        celltype_version="5",
    )
    got = _parse(
        build_oru(case=CASE, result=result.model_copy(update={"domain": check}), control_id="d")
    )
    vt, parts, flag, obs_status, notes, _ = _one(got, "domain-score")
    assert _one(got, "domain-status")[1][0] == status
    if scored:
        assert (vt, float(parts[0]), obs_status) == ("NM", check.score, "P")
        assert flag == ("A" if status == "out_of_domain" else "N")
        assert float(_one(got, "domain-threshold")[1][0]) == pytest.approx(1.9)
        assert "domain-reason" not in got["obs"]
    else:
        assert (parts, obs_status) == ([], "X")
        assert _one(got, "domain-reason")[1][0] == "no_domain_reference"
    assert "celltype 5" in notes[0]


def test_no_domain_obx_when_the_check_is_off(result):
    got = _parse(
        build_oru(case=CASE, result=result.model_copy(update={"domain": None}), control_id="d")
    )
    assert not any(c.startswith("domain-") for c in got["obs"])


def test_an_hl7_order_is_echoed(result):
    from services.gateway.reading import OrderRef

    order = OrderRef(
        placer_order="PO-9^LIS",
        patient_id="12345^^^HOSP^MR",
        patient_name="DOE^JANE",
        service="marrowscope-cells^AI single cells^99MSC",
    )
    case = CaseHeader(
        analysis_id="a9",
        accession="ACC-9",
        specimen_type="bone_marrow_aspirate",
        stain="MGG",
        order=order,
    )
    got = _parse(build_oru(case=case, result=result, control_id="o1"))
    pid = got["msg"].oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "12345^^^HOSP^MR" and pid.pid_5.to_er7() == "DOE^JANE"
    assert got["order"].orc.orc_2.to_er7() == "PO-9^LIS" == got["order"].obr.obr_2.to_er7()
    assert got["order"].obr.obr_4.to_er7() == order.service
    assert order.patient_display() == ("12345", "DOE, JANE")


@pytest.mark.parametrize(("outcome", "orc5"), [("failed", "CM"), ("cancelled", "CA")])
def test_an_analysis_without_a_result_says_so(outcome, orc5):
    from services.gateway.hl7 import build_no_result_oru

    er7 = build_no_result_oru(
        case=CASE, outcome=outcome, reason="segmentation service error", control_id="m9"
    )
    got = _parse(er7)
    assert got["order"].obr.obr_25.value == "X"  # no results can be obtained
    assert got["order"].orc.orc_5.value == orc5
    _, parts, _, status, notes, _ = _one(got, "analysis-outcome")
    assert parts[0] == outcome and status == "X"
    assert "segmentation service error" in notes[0]
    _, reason, _, status, _, _ = _one(got, "analysis-reason")
    assert reason == ["segmentation service error"] and status == "X"
    assert "p-aml" not in got["obs"]
