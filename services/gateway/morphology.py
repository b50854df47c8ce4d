"""Genetic lesions by morphology: the report's `npm1_morphology`, `apl_morphology`, ... calls
from the ensemble's genetic heads (one per registered `marrowscope.targets` entry).

An ensemble version trained with `targets: ["aml", "npm1", "apl"]` answers `P_NPM1` =
P(NPM1 mutated | AML) and `P_APL` = P(APL | AML) beside `P_AML`, from the same case feature
vector (the blast morphology hematologists read for NPM1; the promyelocyte-like cells of
APL). Because they read the same features, whatever withholds P(AML) (too few cells,
morphometrics in another unit than the model learned: `services.gateway.units`) withholds
them too. They are separate from the whole-image NPM1 model, whose `p_npm1` /
`npm1_positive` / `npm1_threshold` keep their meaning.

Each threshold is the one the model records (`<target>_threshold` response parameter), else
the gateway's setting named by the target (`npm1_threshold`, `apl_threshold`);
`threshold_source` says which.

With `apl_model` mil the APL call comes from the MIL model instead (`mil_morphology`: its
P(APL | AML) over the cells' embeddings, `model` mil, the deployment's `apl_threshold`),
under the same rules: withheld when P(AML) is, not_applicable for a case called non-AML.
"""

from __future__ import annotations

from marrowscope.targets import BY_CODE, NPM1, GeneticTarget, genetic_targets
from services.gateway.clients import EnsembleOutput, MilOutput, ModelInfo
from services.gateway.config import GatewaySettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.result import AmlCall, GeneticMorphologyCall


def _aml_gate(
    aml: AmlCall,
    aml_positive: bool | None,
    p_aml: float | None,
    lesion: str,
    settings: GatewaySettings,
) -> tuple[str, str | None, str | None] | None:
    """(status, reason, detail) when the AML call rules out a P(lesion | AML) finding, else
    None. A genetic head reads the same features as P(AML), so whatever withholds P(AML)
    withholds it too (abstained); a case called non-AML gets not_applicable."""
    if aml.status == "abstained":
        return "abstained", aml.reason, aml.detail
    if aml_positive is False:
        shown = "n/a" if p_aml is None else f"{p_aml:.3f}"
        return (
            "not_applicable",
            "not_aml",
            f"P(AML) {shown} is below the AML threshold {settings.aml_threshold}: "
            f"P({lesion} | AML) is reported only for cases called AML",
        )
    return None


def genetic_morphology(
    target: GeneticTarget,
    aml: AmlCall,
    answer: EnsembleOutput | None,
    *,
    ensemble: ModelInfo,
    settings: GatewaySettings,
    metrics: GatewayMetrics | None = None,
    aml_positive: bool | None = None,
) -> GeneticMorphologyCall:
    """The result's `<target>_morphology` block.

    aml: the result's `aml` call (`status`, `reason`, `detail`); answer: what the pinned
    ensemble answered, None when it was not called (too few cells: its metadata then says
    whether the version has the head); aml_positive: the report's AML call (None when not
    made). not_available (no head) wins over abstained. A case called non-AML gets
    not_applicable: the head was trained on AML cases only, and on a control without
    blasts its P(lesion | AML) is an extrapolation (the demo's control read 100 % for
    NPM1) that a report must not show as a finding.
    """
    p = None if answer is None else answer.p(target.code)
    has_head = p is not None if answer is not None else target.output in ensemble.outputs
    outputs = set(ensemble.outputs) if answer is None else set(answer.p_targets)
    aml_only = not outputs & ({t.output for t in genetic_targets()} | set(BY_CODE))
    model_threshold = None if answer is None else answer.threshold(target.code)
    p_aml = None if answer is None else answer.p_aml
    deployment = float(getattr(settings, target.gateway_threshold_setting, 0.5))
    threshold = deployment if model_threshold is None else model_threshold
    source = "deployment" if model_threshold is None else "model"
    if not has_head:
        status, reason = "not_available", target.missing_reason
        detail = f"ensemble version {ensemble.version} has no {target.code.upper()} output " + (
            "(trained for AML only)" if aml_only else f"(no {target.output})"
        )
    elif (gate := _aml_gate(aml, aml_positive, p_aml, target.name, settings)) is not None:
        status, reason, detail = gate
    else:
        status, reason, detail = "predicted", None, None
    call = GeneticMorphologyCall(
        status=status,
        p=p if status == "predicted" else None,
        positive=p >= threshold if status == "predicted" else None,
        threshold=threshold,
        threshold_source=source,
        reason=reason,
        detail=detail,
        model_version=ensemble.version,
        model="ensemble",
    )
    if metrics is not None:
        if target is NPM1:
            metrics.npm1_morphology.labels(call.status).inc()
        metrics.genetic_morphology.labels(target.code, call.status).inc()
    return call


def mil_morphology(
    aml: AmlCall,
    answer: MilOutput | None,
    problem: tuple[str, str] | None,
    *,
    mil_version: str,
    p_aml: float | None,
    aml_positive: bool | None,
    settings: GatewaySettings,
    metrics: GatewayMetrics | None = None,
) -> GeneticMorphologyCall:
    """The result's `apl_morphology` from the MIL model (`model` mil).

    problem: (reason, detail) when the MIL model cannot answer (not served, another
    embedding size or celltype lineage): not_available, which wins as for a missing head.
    Otherwise abstained when P(AML) was withheld, not_applicable for a case called non-AML,
    predicted when the model answered."""
    threshold = float(settings.apl_threshold)
    p = None if answer is None else answer.p_apl
    if problem is not None:
        status, reason, detail = "not_available", problem[0], problem[1]
    elif (gate := _aml_gate(aml, aml_positive, p_aml, "APL", settings)) is not None:
        status, reason, detail = gate
    elif p is None:
        status, reason, detail = "not_available", "no_mil_model", "the MIL model did not answer"
    else:
        status, reason, detail = "predicted", None, None
    call = GeneticMorphologyCall(
        status=status,
        p=p if status == "predicted" else None,
        positive=p >= threshold if status == "predicted" and p is not None else None,
        threshold=threshold,
        threshold_source="deployment",
        reason=reason,
        detail=detail,
        model_version=mil_version,
        model="mil",
    )
    if metrics is not None:
        metrics.genetic_morphology.labels("apl", call.status).inc()
    return call


def morphology_calls(
    aml: AmlCall,
    answer: EnsembleOutput | None,
    *,
    ensemble: ModelInfo,
    settings: GatewaySettings,
    metrics: GatewayMetrics | None = None,
    aml_positive: bool | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, GeneticMorphologyCall]:
    """`{report_entry: call}` for every genetic target (`npm1_morphology`, `apl_morphology`)
    but those in `skip` (target codes another model answers)."""
    return {
        t.report_entry: genetic_morphology(
            t,
            aml,
            answer,
            ensemble=ensemble,
            settings=settings,
            metrics=metrics,
            aml_positive=aml_positive,
        )
        for t in genetic_targets()
        if t.code not in skip
    }
