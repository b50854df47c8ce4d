"""MLLP (HL7 v2 Minimal Lower Layer Protocol) client: one message, one ACK.

Framing: 0x0B, the ER7 message (segments separated by CR), 0x1C 0x0D. The sender waits for
the receiver's ACK (original acknowledgement mode, MSA-1 AA / AE / AR) on the same
connection; no answer within `ack_timeout_s` is a failure to retry. TLS (MLLP over TLS, as
IHE ITI TLS profiles use it) when the destination asks for it, with the site's CA and an
optional client certificate.

`Hl7Destination` is one tenant's receiver (`MS_GATEWAY_HL7_DESTINATIONS`, a JSON object of
tenant -> destination). Delivery from the durable outbox: `services.gateway.hl7outbox`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

START, END = b"\x0b", b"\x1c\x0d"


class Hl7Destination(BaseModel):
    """Where one tenant's ORU^R01 messages go and how."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    ca_file: str | None = Field(
        None, description="CA bundle the receiver's certificate must chain to"
    )
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = None
    receiving_application: str = ""
    receiving_facility: str = ""
    sending_facility: str = ""
    processing_id: Literal["P", "D", "T"] = "P"
    pdf: Literal["reference", "embed", "none"] = "reference"
    site_codes: dict[str, tuple[str, str, str]] = Field(
        default_factory=dict,
        description="local code -> (code, text, coding system) the site reads (its own or LOINC)",
    )
    ack_timeout_s: float = Field(30.0, gt=0)
    max_error_attempts: int = Field(
        5, ge=1, description="AE answers (application error) before the message is parked"
    )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class Ack:
    """The receiver's answer: MSA-1 code, MSA-2 (the control id it acknowledges), MSA-3 text,
    and the ACK as received."""

    code: str
    control_id: str
    text: str
    raw: str


class MllpError(ConnectionError):
    """No usable ACK: connection refused or reset, timeout, or a malformed answer."""


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def parse_ack(raw: str) -> Ack:
    """MSA of an ACK (hl7apy, tolerant: receivers' ACKs vary); MllpError when it has none."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        msg = parse_message(raw.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT)
        msa = next(s for s in msg.children if s.name == "MSA")
        return Ack(
            code=msa.msa_1.to_er7(), control_id=msa.msa_2.to_er7(), text=msa.msa_3.to_er7(), raw=raw
        )
    except (HL7apyException, StopIteration, AttributeError) as exc:
        raise MllpError(f"not an HL7 ACK ({type(exc).__name__})") from exc


async def send(destination: Hl7Destination, message: str) -> Ack:
    """Send one framed message and read one framed ACK; MllpError on any transport failure."""
    timeout = destination.ack_timeout_s
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                destination.host, destination.port, ssl=destination.ssl_context()
            )
            try:
                writer.write(frame(message))
                await writer.drain()
                data = await reader.readuntil(END)
            finally:
                writer.close()
    except TimeoutError:
        raise MllpError(f"no ACK within {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        raise MllpError("connection closed before an ACK") from None
    except asyncio.LimitOverrunError:
        raise MllpError("ACK larger than the read limit") from None
    except (OSError, ssl.SSLError) as exc:
        raise MllpError(f"{type(exc).__name__}: {exc}") from None
    start = data.find(START)
    if start < 0:
        raise MllpError("ACK without the MLLP start byte")
    return parse_ack(data[start + 1 : -len(END)].decode("utf-8", errors="replace"))
