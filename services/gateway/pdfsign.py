"""A PAdES signature on the signed-out PDF report, with the lab's certificate (pyHanko).

The report a hematologist signed out (FHIR `final`/`amended`, ORU result status F/C) can
carry a digital signature in the PDF itself, so that a document archived outside
MarrowScope still shows who issued it and that it was not changed since: PAdES baseline B-B
(`ETSI.CAdES.detached`), added as an incremental update, so the PDF/A-2b parts written by
`services.gateway.pdfa` stay as they are. Preliminary reports are never signed: an
AI-generated, unreviewed result must not look like an issued one.

The lab's key and certificate come as one PKCS#12 file (`MS_GATEWAY_PDF_SIGNING_P12`, its
password in `MS_GATEWAY_PDF_SIGNING_PASSWORD`), loaded once at startup: a missing file or a
wrong password stops the process with the reason instead of failing the first sign-out.
The signature names the lab (the certificate) and, in its reason, the reviewer who signed
out; it is the lab issuing the report, not a personal signature of the reviewer.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from services.gateway.reading import SignOut

log = logging.getLogger(__name__)

FIELD_NAME = "MarrowScopeReport"


class SigningError(RuntimeError):
    """The configured signing key cannot be used (file, password, certificate)."""


class ReportSigner:
    """Signs report PDFs with one PKCS#12 key; thread-safe (no state changes after init)."""

    def __init__(self, p12: Path, password: str | None, *, location: str | None = None) -> None:
        from pyhanko.sign import signers

        try:
            data = Path(p12).read_bytes()
        except OSError as exc:
            raise SigningError(f"PDF signing key {p12}: {exc.strerror or exc}") from None
        try:
            signer = signers.SimpleSigner.load_pkcs12_data(
                data, other_certs=None, passphrase=None if password is None else password.encode()
            )
        except Exception as exc:  # pyHanko/cryptography raise several types for a bad file
            raise SigningError(
                f"PDF signing key {p12} could not be read (wrong password or not PKCS#12): "
                f"{type(exc).__name__}"
            ) from None
        if signer is None or signer.signing_cert is None:
            raise SigningError(f"PDF signing key {p12} holds no certificate and key")
        self._signer = signer
        self.location = location
        self.subject = signer.signing_cert.subject.human_friendly

    def sign(self, pdf: bytes, sign_out: SignOut) -> bytes:
        """`pdf` with a PAdES B-B signature appended (incremental update)."""
        from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
        from pyhanko.sign import fields, signers

        what = "Amended report" if sign_out.amended else "Report"
        meta = signers.PdfSignatureMetadata(
            field_name=FIELD_NAME,
            reason=f"{what} signed out by {sign_out.reviewer}",
            location=self.location,
            subfilter=fields.SigSeedSubFilter.PADES,
            md_algorithm="sha256",
        )
        writer = IncrementalPdfFileWriter(io.BytesIO(pdf))
        out = signers.sign_pdf(writer, meta, signer=self._signer)
        return bytes(out.getvalue())


def finish(pdf: bytes, sign_out: SignOut | None, signer: ReportSigner | None) -> bytes:
    """The report as it leaves the gateway: signed when it is signed out and a key is
    configured, else unchanged."""
    if sign_out is None or signer is None:
        return pdf
    return signer.sign(pdf, sign_out)


def signer_from(settings: Any) -> ReportSigner | None:
    """The configured signer (`GatewaySettings.pdf_signing_*`), or None."""
    if settings.pdf_signing_p12 is None:
        return None
    password = settings.pdf_signing_password
    signer = ReportSigner(
        settings.pdf_signing_p12,
        None if password is None else password.get_secret_value(),
        location=settings.pdf_signing_location,
    )
    log.info("signed-out PDF reports are signed as %s", signer.subject)
    return signer
