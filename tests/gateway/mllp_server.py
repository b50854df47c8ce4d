"""A real MLLP receiver for the tests: framed messages in (0x0B ... 0x1C 0x0D), one framed
hl7apy-built ACK out per message, with the MSA-1 code the test chooses (AA, AE, AR);
optionally over TLS (`self_signed` makes a certificate for 127.0.0.1)."""

from __future__ import annotations

import socketserver
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime

START, END = b"\x0b", b"\x1c\x0d"


def ack_for(message: str, code: str, text: str = "") -> str:
    """An ACK^R01 for `message`: MSA-1 `code`, MSA-2 its MSH-10 (read with hl7apy)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.parser import parse_message

    received = parse_message(message, validation_level=VALIDATION_LEVEL.TOLERANT)
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "TEST-LIS"
    ack.msh.msh_7 = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK" + received.msh.msh_10.to_er7()[:17]
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = received.msh.msh_10.to_er7()
    if text:
        ack.msa.msa_3 = text
    return str(ack.to_er7())


class MllpServer:
    """Receives on 127.0.0.1:`port`; `answer(message) -> MSA-1 code` decides each ACK.
    `received` lists every message in arrival order (ER7, CR-separated)."""

    def __init__(
        self,
        port: int = 0,
        answer: Callable[[str], str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.received: list[str] = []
        self.answer = answer or (lambda _message: "AA")
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if tls is not None:
                    try:
                        self.request = tls.wrap_socket(self.request, server_side=True)
                    except (ssl.SSLError, OSError):
                        return  # the client refused our certificate
                buf = b""
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        return
                    buf += data
                    while END in buf:
                        framed, buf = buf.split(END, 1)
                        message = framed[framed.index(START) + 1 :].decode()
                        with outer._lock:
                            outer.received.append(message)
                            code = outer.answer(message)
                        reply = ack_for(message, code, "test answer" if code != "AA" else "")
                        self.request.sendall(START + reply.encode() + END)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MllpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def messages(self) -> list[str]:
        with self._lock:
            return list(self.received)


def self_signed(directory) -> tuple[str, str]:
    """(certificate, key) PEM paths of a fresh self-signed certificate for 127.0.0.1."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-lis")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "lis.pem", directory / "lis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)
