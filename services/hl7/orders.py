"""Reading one HL7 v2.5.1 order (OML^O33 or ORM^O01) with hl7apy, and every reason to refuse
it (`Refused`: the ACK code, the HL7 table 0357 error code, where, and why in words).

Checks, in order (the first failing one answers; docs/HL7.md lists them):

1. Framing inside the message: it starts with MSH, with the standard delimiters `|^~\\&`
   (so the ER7 the result message echoes means what it meant), and has an MSH-10.
   Else AR.
2. MSH-12 is 2.5.1 (AR 203), MSH-9 is OML^O33 or ORM^O01 (AR 200 / 201), MSH-11 is P, D
   or T (AR 202).
3. The message parses at hl7apy's strict level (datatypes, lengths: AE 102), every segment
   validates (required fields: AE 101), and an OML^O33 validates as a whole against the
   v2.5.1 structure (AE 100). hl7apy 1.3.5 wrongly requires every member of ORM^O01's
   OBR/RQD/RQ1/RXO/ODS/ODT choice, so an ORM^O01's structure is checked here instead: one
   PID, one ORC, one OBR.
4. What an analysis needs (AE): ORC-1 `NW`, a placer order number (ORC-2 or OBR-2, the
   same when both), an ordered service MarrowScope performs (OBR-4), and the accession.
   Ask-at-order-entry OBX segments set the case's options; the case's metadata is then
   validated by the REST API's own schema (`AnalysisCreate`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from services.gateway.reading import OrderRef
from services.gateway.schemas import AnalysisCreate

VERSION = "2.5.1"
DELIMITERS = "|^~\\&"
STRUCTURES = {("OML", "O33"): "OML_O33", ("ORM", "O01"): "ORM_O01"}
PROCESSING_IDS = frozenset({"P", "D", "T"})
SERVICES: dict[str, Literal["fields", "cells", "slide"]] = {
    "marrowscope-analysis": "fields",
    "marrowscope-cells": "cells",
    "marrowscope-slide": "slide",
}
"""OBR-4 (its first component) -> what the order's inputs are (docs/HL7.md)."""
LOCAL_SYSTEM = "99MSC"
IDEMPOTENCY_PREFIX = "hl7-order:"
MAX_PLACER = 255 - len(IDEMPOTENCY_PREFIX)


class Refused(Exception):
    """The order is not taken: `ack` AE (application error: this message cannot be
    processed as sent) or AR (rejected: not a message this interface accepts), `code` from
    HL7 table 0357, `location` an ERL (`SEG^seq^field`), `app_code` a MarrowScope error code
    (ERR-5) where one names the problem better."""

    def __init__(
        self,
        ack: Literal["AE", "AR"],
        code: int,
        text: str,
        *,
        location: str = "",
        app_code: str | None = None,
    ) -> None:
        super().__init__(text)
        self.ack = ack
        self.code = code
        self.text = text
        self.location = location
        self.app_code = app_code


CODE_TEXT = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    207: "Application internal error",
}
"""HL7 table 0357 (message error condition codes) as used here."""


@dataclass(frozen=True)
class Header:
    """What the ACK needs from MSH, read before anything else can fail: the control id,
    the sender (MSH-3/4 as ER7, echoed in the ACK's MSH-5/6), the message type."""

    control_id: str
    sending_application: str
    sending_facility: str
    message_code: str
    trigger: str
    version: str
    processing_id: str

    @property
    def message_type(self) -> str:
        """`OML^O33` / `ORM^O01` for a supported message, else `other` (a metrics label
        never carries what a sender chose to write)."""
        if (self.message_code, self.trigger) in STRUCTURES:
            return f"{self.message_code}^{self.trigger}"
        return "other"

    @property
    def facility_id(self) -> str:
        """MSH-4's first component (the namespace id), the key of `FACILITY_TENANTS`."""
        return self.sending_facility.split("^", 1)[0]


@dataclass(frozen=True)
class Order:
    """One order, checked: what the analysis is created from."""

    header: Header
    ref: OrderRef
    placer: str
    """The placer order number's entity identifier, for people (audit, ACK text)."""
    accession: str
    kind: Literal["fields", "cells", "slide"]
    metadata: dict[str, Any]
    """The case's metadata as `AnalysisCreate` validated it (without the slide)."""

    @property
    def idempotency_key(self) -> str:
        """Per tenant: a resent order (same placer order number) finds its analysis."""
        return IDEMPOTENCY_PREFIX + self.ref.placer_order


def segments_of(text: str) -> list[str]:
    """The message's segments: CR-separated (LF and CRLF accepted), empty lines dropped."""
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]


def read_header(text: str) -> Header:
    """MSH, read leniently so that even a message refused for its header gets an ACK that
    names its control id; Refused (AR) when there is no usable MSH at all."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_segment

    segments = segments_of(text)
    if not segments or not segments[0].startswith("MSH"):
        raise Refused("AR", 100, "the message does not start with an MSH segment", location="MSH")
    if segments[0][3:8] != DELIMITERS:
        raise Refused(
            "AR",
            102,
            "MSH-1/MSH-2 must be the standard delimiters |^~\\& (the result message echoes "
            "the order's fields as sent)",
            location="MSH^1^2",
        )
    try:
        msh = parse_segment(
            segments[0], version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT
        )
        return Header(
            control_id=msh.msh_10.to_er7(),
            sending_application=msh.msh_3.to_er7(),
            sending_facility=msh.msh_4.to_er7(),
            message_code=msh.msh_9.msh_9_1.to_er7(),
            trigger=msh.msh_9.msh_9_2.to_er7(),
            version=msh.msh_12.msh_12_1.to_er7() if msh.msh_12.children else "",
            processing_id=msh.msh_11.msh_11_1.to_er7() if msh.msh_11.children else "",
        )
    except (HL7apyException, ValueError, AttributeError) as exc:
        raise Refused("AR", 102, f"MSH cannot be read: {exc}", location="MSH") from None


def check_header(h: Header) -> None:
    """Refused (AR) for a message this interface does not accept."""
    if not h.control_id:
        raise Refused("AR", 101, "MSH-10 (message control id) is missing", location="MSH^1^10")
    if h.version != VERSION:
        raise Refused(
            "AR", 203, f"version {h.version or '(none)'}: only {VERSION}", location="MSH^1^12"
        )
    if h.message_code not in {code for code, _ in STRUCTURES}:
        raise Refused(
            "AR",
            200,
            f"message type {h.message_code or '(none)'}: only OML^O33 and ORM^O01",
            location="MSH^1^9",
        )
    if (h.message_code, h.trigger) not in STRUCTURES:
        raise Refused(
            "AR",
            201,
            f"event {h.message_code}^{h.trigger or '(none)'}: only OML^O33 and ORM^O01",
            location="MSH^1^9",
        )
    if h.processing_id not in PROCESSING_IDS:
        raise Refused(
            "AR",
            202,
            f"processing id {h.processing_id or '(none)'}: P, D or T",
            location="MSH^1^11",
        )


def _segments(element: Any) -> Iterator[Any]:
    for child in element.children:
        if child.classname == "Segment":
            yield child
        elif child.classname == "Group":
            yield from _segments(child)


def _validated(text: str, h: Header) -> Any:
    """The message parsed and validated by hl7apy (Refused AE naming the first problem)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.exceptions import ValidationError as Hl7ValidationError
    from hl7apy.parser import parse_message

    try:
        msg = parse_message(
            "\r".join(segments_of(text)),
            find_groups=True,
            validation_level=VALIDATION_LEVEL.STRICT,
        )
    except (HL7apyException, ValueError) as exc:
        raise Refused("AE", 102, f"the message does not parse as {VERSION}: {exc}") from None
    for segment in _segments(msg):
        if segment.name.startswith("Z"):
            continue
        try:
            segment.validate()
        except Hl7ValidationError as exc:
            code = 101 if "Missing required" in str(exc) else 102
            raise Refused("AE", code, f"{segment.name}: {exc}", location=segment.name) from None
    if STRUCTURES[(h.message_code, h.trigger)] == "OML_O33":
        try:
            msg.validate()
        except Hl7ValidationError as exc:
            raise Refused("AE", 100, f"OML^O33 structure: {exc}") from None
    return msg


def _one(found: dict[str, list[Any]], name: str) -> Any:
    got = found.get(name, [])
    if not got:
        raise Refused("AE", 101 if name == "PID" else 100, f"no {name} segment", location=name)
    if len(got) > 1:
        raise Refused(
            "AE", 100, f"{len(got)} {name} segments: one order per message", location=name
        )
    return got[0]


def _first(segment: Any, field: str) -> str:
    """The first repetition of a field as ER7 ('' when empty)."""
    for child in segment.children:
        if child.name == field:
            return str(child.to_er7())
    return ""


def _unescaped(er7_component: str) -> str:
    from services.gateway.reading import unescape

    return unescape(er7_component.split("&", 1)[0])


def _accession(found: dict[str, list[Any]], obr: Any, placer_id: str) -> str:
    """SPM-2 (OML^O33: the placer's, else the filler's specimen id), else OBR-18 (placer
    field 1), else the placer order number."""
    for spm in found.get("SPM", [])[:1]:
        for part in _first(spm, "SPM_2").split("^")[:2]:
            if part.split("&", 1)[0]:
                return _unescaped(part)
    field = _first(obr, "OBR_18").split("^", 1)[0]
    return _unescaped(field) if field else placer_id


_BOOL = {"Y": True, "N": False, "TRUE": True, "FALSE": False, "1": True, "0": False}


def _options(found: dict[str, list[Any]]) -> dict[str, Any]:
    """Ask-at-order-entry OBX segments -> metadata fields (other codes are ignored)."""
    doc: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for k, obx in enumerate(found.get("OBX", []), start=1):
        name = _first(obx, "OBX_3").split("^", 1)[0]
        value = _unescaped(_first(obx, "OBX_5").split("^", 1)[0]).strip()
        where = f"OBX^{k}^5"
        if name == "um-per-px":
            try:
                options["um_per_px"] = float(value)
            except ValueError:
                raise Refused(
                    "AE", 102, f"um-per-px {value!r} is not a number", location=where
                ) from None
        elif name == "explain":
            if value.upper() not in _BOOL:
                raise Refused("AE", 102, f"explain {value!r}: Y or N", location=where)
            options["explain"] = _BOOL[value.upper()]
        elif name == "stain":
            doc["stain"] = value
        elif name == "specimen-type":
            doc["specimen_type"] = value
    if options:
        doc["options"] = options
    return doc


_FIELD_WHERE = {"accession_id": "SPM^1^2", "options": "OBX", "stain": "OBX", "specimen_type": "OBX"}


def parse_order(text: str, h: Header) -> Order:
    """The checked order of a message whose header passed `check_header`."""
    msg = _validated(text, h)
    found: dict[str, list[Any]] = {}
    for segment in _segments(msg):
        found.setdefault(segment.name, []).append(segment)
    pid, orc, obr = _one(found, "PID"), _one(found, "ORC"), _one(found, "OBR")

    control = _first(orc, "ORC_1")
    if control != "NW":
        raise Refused(
            "AE", 103, f"order control {control!r}: only NW (new order)", location="ORC^1^1"
        )
    placer, obr_placer = _first(orc, "ORC_2"), _first(obr, "OBR_2")
    if placer and obr_placer and placer != obr_placer:
        raise Refused(
            "AE", 100, "ORC-2 and OBR-2 name different placer order numbers", location="OBR^1^2"
        )
    placer = placer or obr_placer
    if not placer.split("^", 1)[0]:
        raise Refused("AE", 101, "no placer order number (ORC-2 or OBR-2)", location="ORC^1^2")
    if len(placer) > MAX_PLACER:
        raise Refused(
            "AE", 102, f"placer order number longer than {MAX_PLACER}", location="ORC^1^2"
        )
    service = _first(obr, "OBR_4")
    parts = service.split("^")
    system = parts[2] if len(parts) > 2 else ""
    kind = SERVICES.get(parts[0])
    if kind is None or system not in ("", LOCAL_SYSTEM):
        raise Refused(
            "AE",
            103,
            f"universal service {parts[0] or '(none)'}: MarrowScope performs "
            f"{', '.join(SERVICES)} ({LOCAL_SYSTEM})",
            location="OBR^1^4",
        )
    patient_id = _first(pid, "PID_3")
    if not patient_id.split("^", 1)[0]:
        raise Refused("AE", 101, "PID-3 (patient identifier) is empty", location="PID^1^3")
    placer_id = _unescaped(placer.split("^", 1)[0])
    accession = _accession(found, obr, placer_id)

    doc = {
        "accession_id": accession,
        "input": "cells" if kind == "cells" else "fields",
        **_options(found),
    }
    try:
        meta = AnalysisCreate.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise Refused(
            "AE",
            102,
            f"{loc}: {first['msg']}",
            location=_FIELD_WHERE.get(str(first["loc"][0]), "") if first["loc"] else "",
        ) from None
    return Order(
        header=h,
        ref=OrderRef(
            placer_order=placer,
            patient_id=patient_id,
            patient_name=_first(pid, "PID_5"),
            service=service,
        ),
        placer=placer_id,
        accession=accession,
        kind=kind,
        metadata=meta.model_dump(mode="json"),
    )


ACCESSION_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""An accession that names an input folder or slide file: no separators, no dot-dot."""
