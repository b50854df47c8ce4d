"""What a review says about the models: each cell's final label beside the model's call, the
reviewer-agreement tally per celltype version, cell type and tenant, and the `review` block
of the JSON report.

Read-only over `cases` (`review_of`, `case_cells`, `differential_of`), so the
export to training (`training.data.corrections`), the gateway's agreement metrics and the
report all read a review the same way.

Cells the reviewer drew (a box with no model call) and cells in an excluded region or image
are read from the `CellView` attributes `added` / `excluded` when the review app has them;
without those attributes a cell with no model call and a reviewer's label counts as added,
and nothing is excluded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from marrowscope.taxonomy import cell_type
from services.gateway.db import CaseReview, Reviewer
from services.gateway.review import cases
from services.gateway.review.cells import complete_from, differential_of

ReviewState = Literal["unreviewed", "in_review", "signed_out", "amended"]


@dataclass(frozen=True)
class ReviewedCell:
    """One cell of a reviewed case as training and the agreement figures read it."""

    id: str
    """`<image index>.<cell index>` of the stored result (`cells.cells_of`)."""
    image: int
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 pixels of the submitted image."""
    model_code: str | None
    """The typer's call; None for a cell the reviewer added (or one the typer left untyped)."""
    label: str | None
    """The final label: the reviewer's correction, else the model's call the reviewer kept."""
    corrected: bool
    added: bool
    excluded: bool

    @property
    def judged(self) -> bool:
        """Counts towards agreement: a model call on a cell the reviewer did not exclude."""
        return self.model_code is not None and not self.excluded and not self.added

    @property
    def kept(self) -> bool:
        return self.judged and self.label == self.model_code


def reviewed_cells(result: Mapping[str, Any], review: CaseReview) -> list[ReviewedCell]:
    out = []
    for c in cases.case_cells(review, result):
        added = c.added
        out.append(
            ReviewedCell(
                id=c.id,
                image=c.image,
                box=c.box,
                model_code=None if added else c.model_code,
                label=c.code,
                corrected=c.reviewed_code is not None and c.reviewed_code != c.model_code,
                added=added,
                excluded=c.excluded,
            )
        )
    return out


def celltype_version(result: Mapping[str, Any]) -> str:
    """The celltype version that made the case's calls ("unknown" when not recorded)."""
    stage = (result.get("model_versions") or {}).get("celltype") or {}
    return str(stage.get("version") or "unknown")


Tally = Counter[tuple[str, str, str, bool]]
"""(tenant, celltype version, model's cell type, kept) -> cells."""


def tally(tenant: str, result: Mapping[str, Any], review: CaseReview) -> Tally:
    """The agreement counts of one reviewed case."""
    version = celltype_version(result)
    return Counter(
        (tenant, version, str(c.model_code), c.kept)
        for c in reviewed_cells(result, review)
        if c.judged
    )


def agreement(counts: Iterable[tuple[tuple[str, str, str, bool], int]]) -> dict[str, Any]:
    """{"overall": {...}, "by_class": {code: {...}}} from tally items, each {cells, kept,
    agreement} (agreement None when no cell was judged)."""
    total: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for (_tenant, _version, code, was_kept), n in counts:
        for key in ("", code):
            total[key] += n
            kept[key] += n if was_kept else 0

    def entry(key: str) -> dict[str, Any]:
        n = total[key]
        return {"cells": n, "kept": kept[key], "agreement": kept[key] / n if n else None}

    return {
        "overall": entry(""),
        "by_class": {code: entry(code) for code in sorted(k for k in total if k)},
    }


def state_of(review: CaseReview | None) -> ReviewState:
    if review is None:
        return "unreviewed"
    if review.state == "signed_out":
        return "amended" if review.amendments else "signed_out"
    return "in_review"


def review_block(
    result: Mapping[str, Any], review: CaseReview | None, reviewer_name: str | None
) -> dict[str, Any]:
    """The JSON report's `review` (result 1.7, `result.ReviewSummary`): the state, who signed
    and when, the comment, amendments, the reviewer's differential recomputed from the
    reviewed labels (the model's stays in the result's `differential`), and the fields whose
    boxes the reviewer declared complete (1.9)."""
    state = state_of(review)
    if review is None:
        return {"state": state, "amendments": 0, "corrected_cells": 0, "complete_images": []}
    cells = cases.case_cells(review, result)
    counted = [c for c in cells if c.counted]  # `counted` leaves excluded cells out
    diff = differential_of(cells, reviewed=True)  # drawn in, excluded out
    signed = review.state == "signed_out" and review.signed_at is not None
    blasts = diff.get("BLA")
    return {
        "state": state,
        "reviewer": reviewer_name if signed else None,
        "signed_at": (
            datetime.fromtimestamp(review.signed_at, UTC).isoformat()
            if signed and review.signed_at is not None
            else None
        ),
        "comment": (review.comment or None) if signed else None,
        "amendments": review.amendments,
        "corrected_cells": sum(1 for c in reviewed_cells(result, review) if c.corrected),
        "n_cells_counted": len(counted),
        "blast_percent": 100 * blasts.fraction if blasts is not None and counted else None,
        "differential": [
            {
                "code": code,
                "name": cell_type(code).name,
                "count": d.count,
                "fraction": d.fraction,
                "ci_low": d.ci_low,
                "ci_high": d.ci_high,
            }
            for code, d in diff.items()
        ],
        "complete_images": sorted(m.image for m in complete_from(review.complete_json)),
    }


def stored_review_block(
    session: Session, analysis_id: str, result: Mapping[str, Any]
) -> dict[str, Any]:
    """`review_block` of an analysis as the job store holds its review now."""
    review = session.get(CaseReview, analysis_id)
    signer = session.get(Reviewer, review.signed_by) if review and review.signed_by else None
    return review_block(result, review, signer.display_name if signer else None)


class AgreementCache:
    """The agreement tally over every signed-out case, for the metrics scrape. A case's
    tally is computed once per revision (a sign-out or amendment changes the revision; a
    reopened case drops out until it is signed out again), so a scrape reads only the
    review rows and the cases signed out since the last one."""

    def __init__(self) -> None:
        self._cases: dict[str, tuple[int, Tally]] = {}

    def totals(self, session: Session) -> Tally:
        from sqlalchemy import select

        from services.gateway import store
        from services.gateway.db import Analysis

        rows = session.execute(
            select(CaseReview.analysis_id, CaseReview.revision, Analysis.tenant)
            .join(Analysis, Analysis.id == CaseReview.analysis_id)
            .where(CaseReview.state == "signed_out")
        ).all()
        fresh: dict[str, tuple[int, Tally]] = {}
        for analysis_id, revision, tenant in rows:
            cached = self._cases.get(analysis_id)
            if cached is not None and cached[0] == revision:
                fresh[analysis_id] = cached
                continue
            result = store.result_of(session, analysis_id=analysis_id)
            review = session.get(CaseReview, analysis_id)
            if result is None or review is None:
                continue
            fresh[analysis_id] = (revision, tally(tenant, result, review))
        self._cases = fresh
        out: Tally = Counter()
        for _, counts in fresh.values():
            out.update(counts)
        return out
