"""A test lab's signing key (self-signed certificate + key as PKCS#12) and pyHanko's
validation of a report's signature against it."""

from __future__ import annotations

import datetime as dt
import io
import tempfile
from pathlib import Path

from services.gateway.pdfsign import FIELD_NAME

PASSWORD = "lab-key-password"


def make_p12(path: Path, password: str = PASSWORD) -> bytes:
    """A self-signed lab certificate and its key as PKCS#12 at `path`; returns the
    certificate (DER) to trust when validating."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Haematology Lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, "MarrowScope report signing (test)"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"lab",
            key,
            cert,
            None,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    return cert.public_bytes(serialization.Encoding.DER)


def signature_status(pdf: bytes, trusted_der: bytes):
    """pyHanko's validation of the report's one signature, trusting only the test lab."""
    from pyhanko.keys import load_cert_from_pemder
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    reader = PdfFileReader(io.BytesIO(pdf))
    (sig,) = reader.embedded_signatures
    assert sig.field_name == FIELD_NAME
    with tempfile.NamedTemporaryFile(suffix=".der") as f:  # the loader reads a file
        f.write(trusted_der)
        f.flush()
        root = load_cert_from_pemder(f.name)
    return sig, validate_pdf_signature(sig, ValidationContext(trust_roots=[root]))
