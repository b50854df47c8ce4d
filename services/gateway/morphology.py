"""NPM1 by morphology: the report's `npm1_morphology` call from the ensemble's second output.

An ensemble version trained with `targets: ["aml", "npm1"]` answers `P_NPM1` = P(NPM1 mutated
| AML) beside `P_AML`, from the same case feature vector (the blast morphology hematologists
read for NPM1: cup-like nuclei, nucleoli, condensed chromatin). Because it reads the same
features, whatever withholds P(AML) (too few cells, morphometrics in another unit than the
model learned: `services.gateway.units`) withholds it too. It is a separate call from the
whole-image NPM1 model, whose `p_npm1` / `npm1_positive` / `npm1_threshold` keep their meaning.

The threshold is the one the model records (`npm1_threshold` response parameter), else the
gateway's `npm1_threshold` setting; `threshold_source` says which.
"""

from __future__ import annotations

from services.gateway.clients import EnsembleOutput, ModelInfo
from services.gateway.config import GatewaySettings
from services.gateway.metrics import GatewayMetrics

OUTPUT = "P_NPM1"
"""The ensemble output of the NPM1 head (listed in the version's ModelMetadata when present)."""


def npm1_morphology(
    aml: dict,
    answer: EnsembleOutput | None,
    *,
    ensemble: ModelInfo,
    settings: GatewaySettings,
    metrics: GatewayMetrics | None = None,
    aml_positive: bool | None = None,
) -> dict:
    """The result's `npm1_morphology` block (`result.Npm1MorphologyCall`).

    aml: the result's `aml` block (`status`, `reason`, `detail`); answer: what the pinned
    ensemble answered, None when it was not called (too few cells: its metadata then says
    whether the version has the head); aml_positive: the report's AML call (None when not
    made). not_available (no head) wins over abstained. A case called non-AML gets
    not_applicable: the head was trained on AML cases only, and on a
    control without blasts its P(NPM1 | AML) is an extrapolation (the demo's control read
    100 %) that a report must not show as a finding.
    """
    has_head = answer.p_npm1 is not None if answer is not None else OUTPUT in ensemble.outputs
    model_threshold = None if answer is None else answer.npm1_threshold
    threshold = settings.npm1_threshold if model_threshold is None else model_threshold
    call = {
        "status": "predicted",
        "p": None,
        "positive": None,
        "threshold": threshold,
        "threshold_source": "deployment" if model_threshold is None else "model",
        "reason": None,
        "detail": None,
        "model_version": ensemble.version,
    }
    if not has_head:
        call.update(
            status="not_available",
            reason="no_npm1_output",
            detail=f"ensemble version {ensemble.version} has no NPM1 output (trained for AML only)",
        )
    elif aml["status"] == "abstained":
        # the same features as P(AML): the same reasons to distrust them
        call.update(status="abstained", reason=aml["reason"], detail=aml["detail"])
    elif aml_positive is False:
        call.update(
            status="not_applicable",
            reason="not_aml",
            detail=f"P(AML) {answer.p_aml:.3f} is below the AML threshold {settings.aml_threshold}: "
            "P(NPM1 mutated | AML) is reported only for cases called AML",
        )
    else:
        call.update(p=answer.p_npm1, positive=answer.p_npm1 >= threshold)
    if metrics is not None:
        metrics.npm1_morphology.labels(call["status"]).inc()
    return call
