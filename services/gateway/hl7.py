"""The HL7 v2.5.1 ORU^R01 result message of one finished analysis, built and validated with
hl7apy (never by string concatenation).

Profile (docs/HL7.md): MSH, PID (the patient from the HL7 order when one came, else the
accession as an `ACSN` identifier), ORC (RE, the accession as placer and the analysis id as
filler order number), OBR (universal service `marrowscope-analysis`, OBR-25 the result
status), NTE (disclaimer, sign-out), then one OBX per result, each coded from the one table
`services.gateway.hl7codes`: every call with its status and reason, blasts, the full
differential with intervals, non-counted detections, the input kind, repeated images, the
model versions and the PDF (a reference to `?format=pdf`, or embedded as ED).

Result status (OBX-11, OBR-25): P until a hematologist signs out, F after, C for an
amendment (`reading.result_status`: the review app passes its `SignOut`, nothing else
changes); X on a value that was withheld or is not available, N where it does not apply.

Validation: strict (hl7apy VALIDATION_LEVEL.STRICT, v2.5.1 structure, tables' datatypes and
lengths). hl7apy types each component of OBX-5 (datatype `varies`) as ST, 199 characters, so
an embedded PDF (ED) cannot pass the strict length check: `pdf="embed"` builds the same
message at the tolerant level (structure still checked), `pdf="reference"` (default) stays
strict.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from services.gateway.hl7codes import ANALYSIS, CODING_SYSTEM, UCUM, Code, code
from services.gateway.reading import (
    CaseHeader,
    ResultStatus,
    SignOut,
    genetic_calls,
    non_counted,
    result_status,
    target_meaning,
)
from services.gateway.result import AnalysisResult, GeneticMorphologyCall

log = logging.getLogger(__name__)
VERSION = "2.5.1"
SENDING_APPLICATION = "MARROWSCOPE"
_UNIT_TEXT = {"1": "probability", "%": "percent"}


@dataclass(frozen=True)
class Hl7Options:
    """Per destination: MSH-5/6 names, MSH-11 processing id, how the PDF travels, and the
    site's codes for local ones (`hl7codes` module doc)."""

    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "D", "T"] = "P"
    pdf: Literal["reference", "embed", "none"] = "reference"
    site_codes: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)


def _dt() -> dict[str, Any]:
    from hl7apy.v2_5_1 import get_base_datatypes

    types: dict[str, Any] = get_base_datatypes()
    return types


def escape(text: str) -> str:
    """`text` as one ER7 component: hl7apy's own escaping of the delimiters (| ^ & ~ \\)."""
    return str(_dt()["ST"](text).to_er7())


_esc = escape


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _num(value: float, digits: int = 6) -> str:
    return f"{round(float(value), digits):g}"


class _Builder:
    """Appends segments to one ORU^R01 in message order."""

    def __init__(self, options: Hl7Options, status: ResultStatus, observed: datetime) -> None:
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.core import Message

        self.level = (
            VALIDATION_LEVEL.TOLERANT if options.pdf == "embed" else VALIDATION_LEVEL.STRICT
        )
        self.msg = Message("ORU_R01", version=VERSION, validation_level=self.level)
        self.options = options
        self.status = status
        self.observed = _ts(observed)
        self.n_obx = 0
        self.order: Any = None

    def ce(self, entry: Code) -> str:
        """OBX-3 / OBR-4: the site's code first where it maps one, the local code beside."""
        local = [_esc(entry.code), _esc(entry.text[:199]), CODING_SYSTEM]
        site = self.options.site_codes.get(entry.code)
        if site is None:
            return "^".join(local)
        return "^".join([_esc(site[0]), _esc(site[1][:199]), _esc(site[2]), *local])

    def obx(
        self,
        name: str,
        value: list[str] | None,
        *,
        status: str | None = None,
        flag: str | None = None,
        notes: tuple[str, ...] = (),
        value_type: str | None = None,
    ) -> None:
        """One OBX (with NTEs): `value` as ER7 components already escaped; None: no value
        (status X or N)."""
        entry = code(name)
        group = self.order.add_group("ORU_R01_OBSERVATION")
        obx = group.obx
        self.n_obx += 1
        obx.obx_1 = str(self.n_obx)
        obx.obx_2 = value_type or entry.value_type
        obx.obx_3 = self.ce(entry)
        if value is not None:
            obx.obx_5 = "^".join(value)
        if entry.unit is not None:
            obx.obx_6 = f"{_esc(entry.unit)}^{_UNIT_TEXT.get(entry.unit, '')}^{UCUM}"
        if flag is not None:
            obx.obx_8 = flag
        obx.obx_11 = status or self.status
        obx.obx_14 = self.observed
        for note in notes:
            nte = group.add_segment("NTE")
            nte.nte_3 = _dt()["FT"](note)

    def number(self, name: str, value: float | int | None, **kw: Any) -> None:
        self.obx(name, None if value is None else [_num(value)], **kw)

    def coded(self, name: str, value: str, text: str, **kw: Any) -> None:
        self.obx(name, [_esc(value), _esc(text[:199]), CODING_SYSTEM], **kw)

    def interval(self, name: str, low: float, high: float) -> None:
        """SN `^low^-^high` (comparator empty, separator `-`), in percent."""
        self.obx(name, ["", _num(100 * low, 4), "-", _num(100 * high, 4)])


def _header(b: _Builder, case: CaseHeader, control_id: str, sign_out: SignOut | None) -> None:
    msh = b.msg.msh
    msh.msh_3 = SENDING_APPLICATION
    if b.options.sending_facility:
        msh.msh_4 = _esc(b.options.sending_facility)
    if b.options.receiving_application:
        msh.msh_5 = _esc(b.options.receiving_application)
    if b.options.receiving_facility:
        msh.msh_6 = _esc(b.options.receiving_facility)
    msh.msh_7 = _ts(datetime.now(UTC))
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = _esc(control_id)
    msh.msh_11 = b.options.processing_id

    patient_result = b.msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    order_ref = case.order
    if order_ref is not None:  # an HL7 order: echo its patient, placer number and service
        pid.pid_3 = order_ref.patient_id
        pid.pid_5 = order_ref.patient_name
    elif case.patient_id:
        pid.pid_3 = f"{_esc(case.patient_id)}^^^^MR"
    else:  # no HL7 order: the accession is the only identifier the LIS gave
        pid.pid_3 = f"{_esc(case.accession)}^^^^ACSN"
    if order_ref is None:
        # PID-5 is required: without a name from an order, XPN-7 name type U (unspecified)
        pid.pid_5 = _esc(case.patient_name) if case.patient_name else "^^^^^^U"

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    b.order = order
    placer = order_ref.placer_order if order_ref is not None else _esc(case.accession)
    filler = f"{_esc(case.analysis_id)}^{SENDING_APPLICATION}"
    orc = order.orc
    orc.orc_1 = "RE"
    orc.orc_2 = placer
    orc.orc_3 = filler
    orc.orc_5 = "CM"
    orc.orc_9 = b.observed
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_2 = placer
    obr.obr_3 = filler
    obr.obr_4 = order_ref.service if order_ref is not None else b.ce(code(ANALYSIS))
    if case.submitted_at is not None:
        obr.obr_7 = _ts(case.submitted_at)
    obr.obr_22 = b.observed
    obr.obr_24 = "HM"
    obr.obr_25 = b.status
    notes = [
        "AI-generated decision support; not a diagnosis. Review by a qualified hematologist "
        "is required."
    ]
    if sign_out is not None:
        verb = "Amended" if sign_out.amended else "Signed out"
        line = f"{verb} by {sign_out.reviewer} on {sign_out.signed_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        notes.append(line + (f": {sign_out.comment}" if sign_out.comment else ""))
    else:
        notes.append("AI-generated, preliminary: not reviewed by a hematologist.")
    for text in notes:
        nte = order.add_segment("NTE")
        nte.nte_3 = _dt()["FT"](text)


_STATUS_TEXT = {
    "predicted": "predicted",
    "abstained": "withheld",
    "not_available": "not available from the pinned model",
    "not_applicable": "not applicable (called non-AML)",
}


def _call(
    b: _Builder,
    prefix: str,
    value_code: str,
    *,
    status: str,
    p: float | None,
    positive: bool | None,
    reason: str | None,
    detail: str | None,
    notes: tuple[str, ...],
) -> None:
    """A probability with its status and reason OBXs: X (withheld / not available) or N
    (not applicable) on the value when there is none."""
    obs_status = {"not_applicable": "N"}.get(status, "X") if p is None else None
    flag = None if positive is None else ("A" if positive else "N")
    b.number(value_code, p, status=obs_status, flag=flag, notes=notes)
    b.coded(f"{prefix}-status", status, _STATUS_TEXT.get(status, status))
    if reason:
        b.coded(f"{prefix}-reason", reason, detail or reason, notes=(detail,) if detail else ())


def _genetic(b: _Builder, result: AnalysisResult) -> None:
    for target, morph in genetic_calls(result):
        m: GeneticMorphologyCall = morph
        notes = [target_meaning(target)]
        if m.status == "predicted":
            notes.insert(0, f"conditional on AML; threshold {m.threshold:g} ({m.threshold_source})")
        if m.model:
            notes.append(f"model: {m.model} {m.model_version}")
        _call(
            b,
            f"{target.code}-morphology",
            target.fhir_code,
            status=m.status,
            p=m.p,
            positive=m.positive,
            reason=m.reason,
            detail=m.detail,
            notes=tuple(notes),
        )


def _counts(b: _Builder, result: AnalysisResult) -> None:
    by_code = {d.code: d for d in result.differential}
    if result.blast_percent is not None:
        b.number("blast-percent", result.blast_percent)
        if "BLA" in by_code:
            b.interval("blast-percent-ci95", by_code["BLA"].ci_low, by_code["BLA"].ci_high)
    b.number("counted-cells", result.n_cells_counted)
    b.number("detected-cells", result.n_cells_detected)
    for d in result.differential:
        b.number(f"count-{d.code}", d.count)
        b.number(f"percent-{d.code}", 100 * d.fraction)
        b.interval(f"ci95-{d.code}", d.ci_low, d.ci_high)
    other = 0
    for label, n in non_counted(result).items():
        try:
            b.number(f"noncounted-{label}", n)
        except KeyError:  # a detector label outside the taxonomy (e.g. BCCD's Platelets)
            other += n
    if other:
        b.number("noncounted-other", other)


_DOMAIN_TEXT = {
    "in_domain": "within the training domain",
    "out_of_domain": "out of domain: calls withheld or flagged",
    "not_available": "not checked",
}


def _domain(b: _Builder, result: AnalysisResult) -> None:
    """The per-case domain check (result `domain`): the score (flag A out of domain, X when
    not available), its status, the reason it was not checked, and the threshold."""
    d = result.domain
    if d is None:  # the deployment turned the check off
        return
    flag = None if d.score is None else ("A" if d.status == "out_of_domain" else "N")
    note = f"{d.status}; action {d.action}; celltype {d.celltype_version}; {d.n_cells} cells" + (
        f"; embedding {_num(d.embedding, 4)}, appearance {_num(d.appearance, 4)}"
        if d.embedding is not None and d.appearance is not None
        else ""
    )
    b.number(
        "domain-score",
        d.score,
        status=None if d.score is not None else "X",
        flag=flag,
        notes=(note,),
    )
    b.coded("domain-status", d.status, _DOMAIN_TEXT[d.status])
    if d.reason:
        b.coded("domain-reason", d.reason, d.detail or d.reason)
    if d.threshold is not None:
        b.number("domain-threshold", d.threshold)


def build_oru(
    *,
    case: CaseHeader,
    result: AnalysisResult,
    control_id: str,
    options: Hl7Options | None = None,
    sign_out: SignOut | None = None,
    pdf: bytes | None = None,
    pdf_url: str | None = None,
) -> str:
    """The ORU^R01 as ER7 (segments separated by CR), validated by hl7apy. control_id:
    MSH-10, unique per message; pdf / pdf_url: the report for `options.pdf` embed /
    reference (a missing one is left out, with a warning)."""
    options = options or Hl7Options()
    observed = case.finished_at or datetime.now(UTC)
    b = _Builder(options, result_status(sign_out), observed)
    _header(b, case, control_id, sign_out)

    aml = result.aml
    aml_status = (
        "abstained"
        if result.outcome == "abstained" or (aml is not None and aml.status == "abstained")
        else "not_available"
        if aml is not None and aml.status == "not_available"
        else "predicted"
    )
    notes = (f"threshold {result.aml_threshold:g}",) if result.p_aml is not None else ()
    _call(
        b,
        "aml",
        "p-aml",
        status=aml_status,
        p=result.p_aml,
        positive=result.aml_positive,
        # results before schema 1.1 have no `aml`: only the free-text abstain_reason
        reason=aml.reason if aml is not None else ("abstained" if result.abstain_reason else None),
        detail=aml.detail if aml is not None else result.abstain_reason,
        notes=notes,
    )
    _genetic(b, result)
    if result.p_npm1 is not None:
        flag = "A" if result.npm1_positive else "N"  # the whole-image model's call
        b.number(
            "p-npm1-mutated",
            result.p_npm1,
            flag=flag,
            notes=(f"threshold {result.npm1_threshold:g}",),
        )
    _counts(b, result)
    _domain(b, result)
    kinds = {"fields": "fields of view", "cells": "single-cell images", "slide": "whole slide"}
    b.coded("input-kind", result.input, kinds[result.input])
    b.number("duplicate-images", result.duplicate_images_ignored)
    for stage, v in sorted(result.model_versions.items()):
        try:
            b.obx(f"model-version-{stage}", [_esc(v.version)])
        except KeyError:
            log.warning("no HL7 code for model stage %r; its version is not sent", stage)
    _report(b, pdf, pdf_url)
    b.msg.validate()
    return str(b.msg.to_er7())


def build_no_result_oru(
    *,
    case: CaseHeader,
    outcome: str,
    reason: str | None,
    control_id: str,
    options: Hl7Options | None = None,
) -> str:
    """The ORU^R01 of an analysis that ended without a result (`failed` or `cancelled`), so
    a LIS that ordered it is never left waiting: OBR-25 X (no results can be obtained), ORC-5
    CA for a cancellation, and the outcome and its reason as OBX (status X) and NTE."""
    options = options or Hl7Options()
    b = _Builder(options, "P", case.finished_at or datetime.now(UTC))
    _header(b, case, control_id, None)
    b.order.obr.obr_25 = "X"
    if outcome == "cancelled":
        b.order.orc.orc_5 = "CA"
    text = {"failed": "failed: no result", "cancelled": "cancelled: no result"}[outcome]
    why = reason or "no reason recorded"
    b.coded("analysis-outcome", outcome, text, status="X", notes=(f"{text} ({why})",))
    b.obx("analysis-reason", [_esc(why[:199])], status="X")
    b.msg.validate()
    return str(b.msg.to_er7())


def _report(b: _Builder, pdf: bytes | None, pdf_url: str | None) -> None:
    """The PDF as ED (`^AP^PDF^Base64^data`) or RP (`url^MARROWSCOPE^AP^PDF`)."""
    mode = b.options.pdf
    if mode == "embed" and pdf is not None:
        data = base64.b64encode(pdf).decode("ascii")
        b.obx("report-pdf", ["", "AP", "PDF", "Base64", data], value_type="ED")
    elif mode == "reference" and pdf_url:
        b.obx("report-pdf", [_esc(pdf_url), SENDING_APPLICATION, "AP", "PDF"])
    elif mode != "none":
        log.warning("HL7 pdf=%s but no %s given: the report is not in the message", mode, mode)
