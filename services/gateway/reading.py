"""How a finished result reads to a person: the sentences and picks that the PDF report
(`services.gateway.pdf`) and the HL7 v2 result message (`services.gateway.hl7`) share.

Nothing here computes a figure: every number comes from the one `AnalysisResult`; this
module only words it (calls, abstentions, what a call means and where it stops) and picks
what to show (the image a reader looks at first, the non-counted objects).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from marrowscope.targets import GeneticTarget, genetic_targets
from services.gateway.result import AnalysisResult, GeneticMorphologyCall, ImageResult

ResultStatus = Literal["P", "F", "C"]
"""HL7 table 0123 result status: P preliminary (AI only), F final (signed out), C corrected
(amended after sign-out)."""


HL7_ORDER_KEY = "hl7_order"
"""The key of the stored metadata (`Analysis.metadata_json`) under which the HL7 order
listener (`services.hl7`) keeps what its result message must echo (`OrderRef`)."""


@dataclass(frozen=True)
class OrderRef:
    """What an HL7 v2 order sent that the ORU^R01 echoes, as ER7 with the standard
    delimiters (the listener refuses others): placer order number (ORC-2, EI), patient
    identifier (PID-3, its first CX) and name (PID-5, its first XPN), the ordered service
    (OBR-4, CE)."""

    placer_order: str
    patient_id: str
    patient_name: str
    service: str

    def patient_display(self) -> tuple[str, str]:
        """(id, "FAMILY, GIVEN") for people: the first component of each, unescaped."""
        family, _, rest = self.patient_name.partition("^")
        given = rest.split("^", 1)[0]
        name = ", ".join(unescape(p) for p in (family, given) if p)
        return unescape(self.patient_id.split("^", 1)[0]), name


_ER7_ESCAPES = {"\\F\\": "|", "\\S\\": "^", "\\T\\": "&", "\\R\\": "~", "\\E\\": "\\"}


def unescape(text: str) -> str:
    """ER7 text with the delimiter escapes (`\\S\\` ...) read back as the characters."""
    for seq, char in _ER7_ESCAPES.items():
        text = text.replace(seq, char)
    return text


@dataclass(frozen=True)
class CaseHeader:
    """The order side of a report: what the LIS sent with the case. The REST API carries
    no patient data; `patient_id` / `patient_name` come with an HL7 order (the inbound
    listener), and reports say the LIS holds them under the accession otherwise."""

    analysis_id: str
    accession: str
    specimen_type: str
    stain: str
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    order: OrderRef | None = None
    """The HL7 order that created the analysis (`services.hl7`), None for a REST one."""


class StoredAnalysis(Protocol):
    """The job store's analysis row, as far as a report reads it (`db.Analysis`)."""

    id: str
    accession: str
    specimen_type: str
    stain: str
    created_at: float
    finished_at: float | None
    metadata_json: str


def order_of(metadata_json: str) -> OrderRef | None:
    """The HL7 order stored with an analysis's metadata, None for a REST submission."""
    doc = json.loads(metadata_json or "{}").get(HL7_ORDER_KEY)
    return None if doc is None else OrderRef(**doc)


def case_header(a: StoredAnalysis) -> CaseHeader:
    """The order side of the reports from a stored analysis (REST: no patient data; an HL7
    order: its patient and order numbers)."""

    def ts(t: float | None) -> datetime | None:
        return None if t is None else datetime.fromtimestamp(t, UTC)

    order = order_of(a.metadata_json)
    patient_id, patient_name = order.patient_display() if order is not None else (None, None)
    return CaseHeader(
        analysis_id=a.id,
        accession=a.accession,
        specimen_type=a.specimen_type,
        stain=a.stain,
        submitted_at=ts(a.created_at),
        finished_at=ts(a.finished_at),
        patient_id=patient_id,
        patient_name=patient_name,
        order=order,
    )


@dataclass(frozen=True)
class SignOut:
    """A hematologist's sign-out of the case (from the review app); `amended` when it
    replaces an earlier sign-out."""

    reviewer: str
    signed_at: datetime
    comment: str = ""
    amended: bool = False


def result_status(sign_out: SignOut | None) -> ResultStatus:
    """P until a hematologist signs out, then F, and C for an amendment."""
    if sign_out is None:
        return "P"
    return "C" if sign_out.amended else "F"


AML_MEANING = (
    "P(AML) is the model's probability that these images come from acute myeloid leukemia "
    "rather than non-leukemic marrow, read from the counted cells and their morphometry. It "
    "is decision support for the smear review, not a diagnosis: the WHO/ICC diagnosis needs "
    "the hematologist's count, flow cytometry and genetics."
)

# Plain words per genetic target; a target without an entry gets the generic sentence.
_TARGET_MEANING = {
    "npm1": (
        "If this is AML, the probability that it carries an NPM1 mutation, read from cell "
        "morphology (cup-like nuclei, perinuclear clearing). It is not a molecular test: "
        "confirm NPM1 status by PCR or sequencing."
    ),
    "apl": (
        "If this is AML, the probability that it is acute promyelocytic leukemia (PML-RARA), "
        "read from cell morphology. It is not a genetic test: a suspected APL needs urgent "
        "PML-RARA confirmation (FISH/PCR) and clinical review of coagulation."
    ),
}
WHOLE_IMAGE_NPM1_MEANING = (
    "The whole-image NPM1 model's probability of an NPM1 mutation, averaged over the images "
    "(it reads fields of view, not single cells). Not a molecular test."
)


def target_meaning(target: GeneticTarget) -> str:
    """What `P(target | AML)` means and where it stops, in plain words."""
    return _TARGET_MEANING.get(
        target.code,
        f"If this is AML, the probability of {target.name}, read from cell morphology; "
        "not a genetic test.",
    )


def call_word(positive: bool | None) -> str:
    return "positive" if positive else "negative"


def aml_text(result: AnalysisResult) -> str:
    """The AML call in one line: the probability and call, or why it was withheld."""
    if result.outcome == "abstained":
        return f"no AI call: {result.abstain_reason}"
    if result.p_aml is not None:
        return (
            f"{result.p_aml:.3f} ({call_word(result.aml_positive)} at threshold "
            f"{result.aml_threshold:g})"
        )
    aml = result.aml
    reason = aml.reason if aml is not None else None
    detail = aml.detail if aml is not None else None
    word = "not available" if aml is not None and aml.status == "not_available" else "withheld"
    return f"{word} ({reason}): {detail}" if detail else f"{word} ({reason})"


def synthetic_text(result: AnalysisResult) -> str | None:
    """Which models of the case learned from synthetic data, in one sentence (None: none
    did, or the services did not say)."""
    if not result.synthetic_stages:
        return None
    named = ", ".join(f"{m} ({result.trained_on[m]})" for m in result.synthetic_stages)
    return (
        f"Trained on synthetic data: {named}; what they contribute is not validated on real smears."
    )


DOMAIN_MEANING = (
    "How far this case's cells sit from the cells the cell-type model was trained on (1 = a "
    "typical training cell). Above the threshold the slide, scanner or stain is unlike "
    "anything the models were validated on, and the AI calls are withheld: review the "
    "smear by eye."
)


def domain_text(result: AnalysisResult) -> str | None:
    """The per-case domain check in one line (None when the deployment turned it off)."""
    d = result.domain
    if d is None:
        return None
    if d.status == "not_available":
        return f"not checked ({d.reason})"
    word = "OUT OF DOMAIN" if d.status == "out_of_domain" else "within the training domain"
    threshold = f" (threshold {d.threshold:.2f})" if d.threshold is not None else ""
    score = f"score {d.score:.2f}" if d.score is not None else "no score"
    return f"{word}: {score}{threshold} over {d.n_cells} cells"


def genetic_text(morph: GeneticMorphologyCall) -> str:
    """One genetic call in one line: probability and call, or its status and reason."""
    if morph.status == "predicted" and morph.p is not None:
        source = "the model's" if morph.threshold_source == "model" else "the deployment's"
        return (
            f"{morph.p:.3f} ({call_word(morph.positive)} at {source} threshold {morph.threshold:g})"
        )
    words = {
        "abstained": "withheld with P(AML)",
        "not_available": "not available from the pinned model",
        "not_applicable": "not applicable: the case is called non-AML",
    }.get(morph.status, morph.status)
    return f"{words} ({morph.reason})" if morph.reason else words


def genetic_calls(
    result: AnalysisResult,
) -> list[tuple[GeneticTarget, GeneticMorphologyCall]]:
    """Each genetic target's call the result holds, in report order."""
    calls = []
    for target in genetic_targets():
        morph = getattr(result, target.report_entry, None)
        if isinstance(morph, GeneticMorphologyCall):
            calls.append((target, morph))
    return calls


def non_counted(result: AnalysisResult) -> dict[str, int]:
    """Detections outside the differential (RBC and the non-counted classes), by label."""
    found = Counter(
        c.detector_label for im in result.images for c in im.cells if c.cell_type is None
    )
    return dict(sorted(found.items()))


def most_informative_image(result: AnalysisResult) -> ImageResult | None:
    """The image a reader should see first: with cell importances (explanations or MIL
    attention) the one holding the most important cell; otherwise the one with the most
    blasts, then the most counted cells."""
    if not result.images:
        return None

    def key(im: ImageResult) -> tuple[float, int, int]:
        top = max((c.importance or 0.0 for c in im.cells), default=0.0)
        blasts = sum(1 for c in im.cells if c.cell_type == "BLA")
        return (top if result.importance_source else 0.0, blasts, im.n_counted)

    return max(result.images, key=key)
