"""The ACK of one order (original acknowledgement mode), built and validated with hl7apy:
MSA-1 AA / AE / AR, MSA-2 the order's MSH-10, and for AE / AR an ERR segment naming the
problem (ERR-2 where, ERR-3 the HL7 table 0357 code, ERR-5 MarrowScope's own code where
there is one, ERR-8 the explanation for people)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from services.gateway.hl7 import SENDING_APPLICATION, escape
from services.gateway.hl7codes import CODING_SYSTEM
from services.hl7.orders import CODE_TEXT, VERSION, Header, Refused

AckCode = Literal["AA", "AE", "AR"]
MSA_TEXT_LENGTH = 80


def build_ack(
    header: Header | None,
    code: AckCode,
    *,
    text: str = "",
    refused: Refused | None = None,
) -> str:
    """The ACK as ER7 (CR-separated). `header` None: the message had no readable MSH, so
    MSA-2 is empty and the sender matches the answer by its connection."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message

    # tolerant: MSA-2 echoes the sender's control id as sent, whatever its length
    msg = Message("ACK", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = msg.msh
    msh.msh_3 = SENDING_APPLICATION
    if header is not None:
        if header.sending_application:
            msh.msh_5 = header.sending_application
        if header.sending_facility:
            msh.msh_6 = header.sending_facility
    msh.msh_7 = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    trigger = header.trigger if header is not None and header.message_type != "other" else ""
    msh.msh_9 = f"ACK^{trigger}^ACK" if trigger else "ACK^^ACK"
    msh.msh_10 = uuid.uuid4().hex[:20]
    processing = header.processing_id if header is not None else ""
    msh.msh_11 = processing if processing in ("P", "D", "T") else "P"
    msa = msg.msa
    msa.msa_1 = code
    msa.msa_2 = header.control_id if header is not None else ""
    if text:
        msa.msa_3 = escape(text[:MSA_TEXT_LENGTH])
    if refused is not None:
        err = msg.add_segment("ERR")
        if refused.location:
            err.err_2 = refused.location
        err.err_3 = f"{refused.code}^{escape(CODE_TEXT.get(refused.code, ''))}^HL70357"
        err.err_4 = "E"
        if refused.app_code:
            err.err_5 = f"{escape(refused.app_code)}^^{CODING_SYSTEM}"
        err.err_8 = escape(refused.text[:1000])
    msg.validate()
    return str(msg.to_er7())
