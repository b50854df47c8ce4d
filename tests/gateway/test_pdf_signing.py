"""The PAdES signature of signed-out PDF reports (`services.gateway.pdfsign`), validated with
pyHanko's own validator against the test lab's certificate."""

from __future__ import annotations

import datetime as dt

import pytest

from services.gateway.pdf import build_pdf
from services.gateway.pdfsign import ReportSigner, SigningError, finish
from services.gateway.reading import CaseHeader, SignOut
from tests.gateway.pdfkeys import PASSWORD, make_p12, signature_status
from tools.report_sample import synthetic_case

CASE = CaseHeader(
    analysis_id="a1",
    accession="ACC-1",
    specimen_type="bone_marrow_aspirate",
    stain="MGG",
    finished_at=dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC),
)
SIGNED = SignOut(reviewer="Dr. Meyer", signed_at=dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.UTC))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    path = tmp_path_factory.mktemp("lab") / "lab.p12"
    return path, make_p12(path)


@pytest.fixture(scope="module")
def report():
    _, result = synthetic_case(size=(320, 240))
    return build_pdf(case=CASE, result=result, sign_out=SIGNED)


def test_a_signed_out_report_carries_a_valid_pades_signature(lab, report):
    p12, cert = lab
    signer = ReportSigner(p12, PASSWORD, location="Test City")
    assert "Test Haematology Lab" in signer.subject
    signed = finish(report, SIGNED, signer)
    assert signed.startswith(report)  # an incremental update: the report itself unchanged
    sig, status = signature_status(signed, cert)
    assert status.intact and status.valid and status.trusted, status.pretty_print_details()
    assert sig.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"  # PAdES
    assert "Dr. Meyer" in str(sig.sig_object["/Reason"])
    assert status.coverage.name == "ENTIRE_FILE"
    # one changed byte inside the signed range: no longer intact
    k = len(report) // 2
    tampered = signed[:k] + bytes([signed[k] ^ 0x01]) + signed[k + 1 :]
    _, broken = signature_status(tampered, cert)
    assert not broken.intact


def test_preliminary_reports_and_unconfigured_labs_stay_unsigned(lab, report):
    p12, _ = lab
    assert finish(report, None, ReportSigner(p12, PASSWORD)) == report
    assert finish(report, SIGNED, None) == report


def test_a_bad_key_stops_startup_with_the_reason(lab, tmp_path):
    p12, _ = lab
    with pytest.raises(SigningError, match="wrong password"):
        ReportSigner(p12, "not-the-password")
    with pytest.raises(SigningError, match="No such file"):
        ReportSigner(tmp_path / "missing.p12", PASSWORD)
    junk = tmp_path / "junk.p12"
    junk.write_bytes(b"not a key")
    with pytest.raises(SigningError, match="not PKCS#12"):
        ReportSigner(junk, PASSWORD)
