"""The local observation codes of the HL7 v2 result message (ORU^R01): the one code table.

Every OBX-3 and the OBR-4 universal service id come from `code_table()`, built from the
sources of truth (cell types from `marrowscope.taxonomy`, genetic targets from
`marrowscope.targets`, model stages from `marrowscope.stages`), so a new cell type, target
or stage gets its code without an edit here. Codes are the FHIR renderer's local codes
where both exist (`p-aml`, `blast-percent`, `count-BLA`, the targets' `fhir_code`).

Coding system `99MSC` (HL7 table 0396: `99zzz` is a site-defined local system). No LOINC
code is sent by default, for the reason `services.gateway.fhir` gives: the LOINC
blast/differential codes specify a manual count. A site that maps a code to its own or to
LOINC passes `site_codes` (`{local code: (code, text, system)}`) to the renderer: OBX-3
then carries the site's code first and the local code as the alternate identifier
(CE components 4-6). docs/HL7.md lists the table (a test keeps it complete).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from marrowscope.stages import Stage
from marrowscope.targets import genetic_targets
from marrowscope.taxonomy import CELL_TYPES, COUNTED_CODES, NON_COUNTED_CODES

CODING_SYSTEM = "99MSC"
UCUM = "UCUM"
ANALYSIS = "marrowscope-analysis"
"""OBR-4: the universal service id of the whole analysis."""


@dataclass(frozen=True)
class Code:
    """One local code: its display text, the OBX-2 value type and the UCUM unit (OBX-6)."""

    code: str
    text: str
    value_type: str
    unit: str | None = None


def _status(code: str, what: str, values: str = "predicted/abstained/...") -> list[Code]:
    return [
        Code(f"{code}-status", f"{what}: status ({values})", "CE"),
        Code(f"{code}-reason", f"{what}: reason it was not predicted", "CE"),
    ]


@cache
def code_table() -> dict[str, Code]:
    """Every local code, in message order."""
    names = {c.code: c.name for c in CELL_TYPES}
    codes = [
        Code(ANALYSIS, "AI analysis of bone-marrow smear images", "CE"),
        Code("p-aml", "Probability of acute myeloid leukemia (AI)", "NM", "1"),
        *_status("aml", "P(AML)"),
    ]
    for t in genetic_targets():
        codes.append(Code(t.fhir_code, t.fhir_display, "NM", "1"))
        codes += _status(f"{t.code}-morphology", f"P({t.name} | AML) by morphology")
    codes += [
        Code("p-npm1-mutated", "Probability of NPM1 mutation (AI, mean over images)", "NM", "1"),
        Code("blast-percent", "Blasts per 100 counted nucleated cells (AI count)", "NM", "%"),
        Code("blast-percent-ci95", "Blast percent, Wilson 95% interval", "SN", "%"),
        Code("counted-cells", "Nucleated cells counted (AI)", "NM"),
        Code("detected-cells", "Objects detected, counted or not (AI)", "NM"),
    ]
    for c in COUNTED_CODES:
        codes += [
            Code(f"count-{c}", f"{names[c]} count (AI)", "NM"),
            Code(f"percent-{c}", f"{names[c]} per 100 counted cells (AI)", "NM", "%"),
            Code(f"ci95-{c}", f"{names[c]} percent, Wilson 95% interval", "SN", "%"),
        ]
    codes += [
        Code(f"noncounted-{c}", f"{names[c]} detected, not counted", "NM")
        for c in NON_COUNTED_CODES
    ]
    codes += [
        Code("noncounted-other", "Other detections, not counted", "NM"),
        Code(
            "domain-score",
            "Distance of the case's cells from the cell-type model's training cells (AI)",
            "NM",
            "1",
        ),
        *_status("domain", "Domain check", "in_domain/out_of_domain/not_available"),
        Code("domain-threshold", "Domain check: threshold of the celltype version", "NM", "1"),
        Code("input-kind", "Input: fields of view, single cells or a whole slide", "CE"),
        Code(
            "analysis-outcome", "Analysis outcome when it gave no result (failed, cancelled)", "CE"
        ),
        Code("analysis-reason", "Why the analysis gave no result", "ST"),
        Code("duplicate-images", "Repeated images ignored", "NM"),
    ]
    codes += [Code(f"model-version-{s.value}", f"Model version: {s.value}", "ST") for s in Stage]
    codes.append(Code("report-pdf", "Report (PDF): a reference (RP) or embedded (ED)", "RP"))
    return {c.code: c for c in codes}


def code(name: str) -> Code:
    """The table's entry; a KeyError names a code the table (and docs/HL7.md) lacks."""
    return code_table()[name]
