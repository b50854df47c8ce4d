"""Genetic targets the ensemble can read from morphology: one definition per target.

The ensemble's first output is always P(AML). Each further output is a *genetic target*:
P(lesion | AML) learned from case labels on AML cases only, from the same case feature
vector (`marrowscope.features`). Everything that differs between targets lives in one
`GeneticTarget` entry here, so adding a third target is one entry in `GENETIC_TARGETS`:
the model config accepts it, training labels, thresholds, metrics and CV it, promotion
gates it, the ensemble service answers its output, and the gateway reports it (JSON entry
and FHIR Observation). Names of the existing NPM1 target are the ones on the wire since
result schema 1.2 (`npm1_morphology`, `P_NPM1`, `p-npm1-morphology`) and must not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GeneticTarget:
    """One genetic target of the ensemble.

    code: the config `targets` entry and the metric prefix (`<code>_auroc`);
    name: the lesion for people ("NPM1 mutated");
    column: the case label's column in cases.csv (a CaseRecord field or an extra column);
    positive / negative: the column values that mean 1 / 0, the canonical one first
      (anything else: unknown, the case adds nothing to the loss or the metrics);
    threshold_key: training config key and model `hyperparameters` key of its decision
      threshold (null = 0.5 in training; the gateway's setting when serving);
    threshold_parameter: the ensemble service's response parameter carrying that threshold;
    gateway_threshold_setting: the `GatewaySettings` field used when the model records none;
    floor: promotion floor on `<code>_auroc`;
    output: the ensemble service's output tensor name;
    report_entry: the result's JSON entry (`result.GeneticMorphologyCall`);
    fhir_code / fhir_display: the FHIR Observation code (local code system) and its text;
    missing_reason: the report's reason when the pinned ensemble has no such output.
    """

    code: str
    name: str
    column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    threshold_key: str
    threshold_parameter: str
    gateway_threshold_setting: str
    floor: float
    output: str
    report_entry: str
    fhir_code: str
    fhir_display: str
    missing_reason: str

    def label(self, record: Any) -> int | None:
        """1 / 0 / None (unknown) for a case record: its field `column`, else `extra[column]`.

        Controls (aml_label 0) are always None: the target is conditional on AML."""
        if getattr(record, "aml_label", 1) != 1:
            return None
        value = getattr(record, self.column, None)
        if value is None:
            value = (getattr(record, "extra", None) or {}).get(self.column)
        value = "" if value is None else str(value).strip()
        if value in self.positive:
            return 1
        if value in self.negative:
            return 0
        return None


NPM1 = GeneticTarget(
    code="npm1",
    name="NPM1 mutated",
    column="npm1_status",
    positive=("mutated",),
    negative=("wild_type",),
    threshold_key="npm1_score_threshold",
    threshold_parameter="npm1_threshold",
    gateway_threshold_setting="npm1_threshold",
    floor=0.80,
    output="P_NPM1",
    report_entry="npm1_morphology",
    fhir_code="p-npm1-morphology",
    fhir_display="Probability of NPM1 mutation given AML, from blast morphology (AI)",
    missing_reason="no_npm1_output",
)
APL = GeneticTarget(
    code="apl",
    name="APL",
    column="apl_status",
    positive=("apl", "1"),
    negative=("non_apl", "0"),
    threshold_key="apl_score_threshold",
    threshold_parameter="apl_threshold",
    gateway_threshold_setting="apl_threshold",
    # Eckardt et al., BMC Cancer 2022 report 0.8575 on bone marrow; the floor sits below it
    # as NPM1's 0.80 sits below the paper's 0.92.
    floor=0.75,
    output="P_APL",
    report_entry="apl_morphology",
    fhir_code="p-apl-morphology",
    fhir_display="Probability of acute promyelocytic leukemia (PML-RARA) given AML, "
    "from cell morphology (AI)",
    missing_reason="no_apl_output",
)

GENETIC_TARGETS: tuple[GeneticTarget, ...] = (NPM1, APL)
"""The shipped genetic targets, in the order reports list them."""
BY_CODE: dict[str, GeneticTarget] = {t.code: t for t in GENETIC_TARGETS}
"""The registry every consumer reads at call time (`genetic_targets()`, `genetic_target()`),
so a target added here (or by a test, `monkeypatch.setitem(BY_CODE, ...)`) reaches the
model config, training, promotion, the ensemble service and the gateway at once."""
ENSEMBLE_TARGETS: tuple[str, ...] = ("aml", *BY_CODE)
"""Outputs an ensemble net may have (shipped set; `ensemble_target_codes()` at call time):
`aml` = P(AML) over all cases (the paper's ENN, always first), then any genetic target
(P(lesion | AML), learned on AML cases of known status)."""


def genetic_targets() -> tuple[GeneticTarget, ...]:
    """Every registered genetic target, in report order."""
    return tuple(BY_CODE.values())


def ensemble_target_codes() -> tuple[str, ...]:
    """`aml`, then every registered genetic target's code."""
    return ("aml", *BY_CODE)


def output_of(target: str) -> str:
    """Wire output name of an ensemble target: `P_AML`, `P_NPM1`, `P_APL`, ..."""
    return "P_AML" if target == "aml" else genetic_target(target).output


def genetic_target(code: str) -> GeneticTarget:
    """The definition of `code`; KeyError names the known codes."""
    try:
        return BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown genetic target {code!r}; known: {list(BY_CODE)}") from None
