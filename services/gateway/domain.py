"""The per-case domain check in the gateway (result `domain`; `marrowscope.domain`).

The celltype service answers each typed cell's domain distances with its embeddings when
the pinned version carries a domain reference (`DOMAIN`, beside the weights as
`domain.json`), so the distances are computed in-process with the exact crops and weights
that typed the cells; `calls.DomainRows` collects them over the analysis. Here they become
the case score (the larger of the two medians, `marrowscope.domain.case_score`), compared
with the threshold the version records. Above it, with `MS_GATEWAY_DOMAIN_CHECK=abstain`,
P(AML) abstains with reason out_of_domain, and with it P(NPM1) and the genetic calls
(`morphology._aml_gate`); `warn` only flags the case. A version without a (calibrated)
reference gives `not_available` with the reason, and nothing is withheld for it.
"""

from __future__ import annotations

from marrowscope.domain import case_score
from services.gateway.calls import DomainRows
from services.gateway.config import GatewaySettings
from services.gateway.result import DomainCheck

DIFFERENTIAL_WARNING = (
    "The cells of this case look unlike the cells the cell-type model was trained on "
    "(domain score {score:.2f} above {threshold:.2f}): the differential count may be wrong; "
    "review the cells before using it."
)


def check_domain(
    rows: DomainRows, *, celltype_version: str, settings: GatewaySettings, served: bool = True
) -> DomainCheck | None:
    """The result's `domain` (None when the deployment turns the check off). `served`:
    whether the pinned celltype service declares the DOMAIN output at all."""
    if settings.domain_check == "off":
        return None
    action = "warn" if settings.domain_check == "warn" else "abstain"
    if not served:
        return DomainCheck(
            status="not_available",
            action=action,
            reason="no_domain_reference",
            detail=f"the celltype service (version {celltype_version}) declares no DOMAIN "
            "output: the case could not be checked against its training cells",
            celltype_version=celltype_version,
        )
    scores = rows.scores()
    if not rows.missing and scores is None:
        return DomainCheck(
            status="not_available",
            action=action,
            reason="no_cells",
            detail="no typed cells to check",
            celltype_version=celltype_version,
        )
    if scores is None:
        return DomainCheck(
            status="not_available",
            action=action,
            reason="no_domain_reference",
            detail=f"celltype version {celltype_version} carries no domain reference "
            "(domain.json): the case could not be checked against its training cells",
            celltype_version=celltype_version,
        )
    score = case_score(scores)
    thresholds = rows.thresholds
    threshold = next(iter(thresholds)) if len(thresholds) == 1 else None
    common = {
        "action": action,
        "score": score.score,
        "embedding": score.embedding,
        "appearance": score.appearance,
        "n_cells": score.n_cells,
        "celltype_version": celltype_version,
    }
    if threshold is None:
        return DomainCheck(
            status="not_available",
            reason="domain_reference_not_calibrated",
            detail=f"celltype version {celltype_version} records no domain threshold",
            **common,
        )
    status = "out_of_domain" if score.score > threshold else "in_domain"
    return DomainCheck(status=status, threshold=threshold, **common)


def differential_warning(check: DomainCheck | None) -> str | None:
    if check is None or check.status != "out_of_domain":
        return None
    assert check.score is not None and check.threshold is not None
    return DIFFERENTIAL_WARNING.format(score=check.score, threshold=check.threshold)


def domain_abstention(check: DomainCheck | None) -> dict[str, str] | None:
    """{reason, detail} withholding P(AML) (and what stands on it), else None."""
    if check is None or check.status != "out_of_domain" or check.action != "abstain":
        return None
    return {
        "reason": "out_of_domain",
        "detail": f"the case's cells sit outside what celltype {check.celltype_version} was "
        f"trained on (domain score {check.score:.2f} above its threshold "
        f"{check.threshold:.2f}): P(AML), P(NPM1) and the genetic calls are withheld",
    }
