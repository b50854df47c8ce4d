"""A case under review: its cells as the reviewer sees them, their corrections, the reviewed
differential, sign-out and reopening.

The model's result is never changed: the reviewer's labels live beside it in
`case_reviews.labels_json` (cell id -> code), and the reviewed differential is recomputed
from the model's calls with the reviewer's labels laid over them, by the same function the
pipeline uses (`marrowscope.features.differential_of_codes`), so both figures mean the
same thing. A cell id is `<image index>.<cell index>` in the stored result.

States: `in_review` (the default; corrections allowed) -> `signed_out` (final; no edits)
-> reopened with a reason (`in_review` again, `amendments` + 1) -> `signed_out` again,
which the reports call amended. Every change needs the revision the reviewer last saw;
a stale one raises `StaleRevision` and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from marrowscope.features import DifferentialEntry, differential_of_codes
from marrowscope.taxonomy import CODES, COUNTED_CODES
from services.gateway import hl7outbox, store
from services.gateway.db import Analysis, CaseReview, Outbox, Reviewer, now
from services.gateway.reading import SignOut
from services.gateway.review.accounts import ReviewerIdentity

REVIEWABLE_STATUSES = frozenset({"succeeded", "abstained"})
MAX_COMMENT = 4000


class ReviewError(ValueError):
    """A change that cannot be made (unknown cell or label, signed-out case, no result)."""


class StaleRevision(ReviewError):
    """Another reviewer changed the case since this reviewer loaded it."""


@dataclass(frozen=True)
class CellView:
    id: str
    image: int
    box: tuple[float, float, float, float]
    model_code: str | None
    confidence: float | None
    importance: float | None
    attention: float | None
    reviewed_code: str | None
    """The reviewer's label, None while the reviewer has not changed the model's call."""

    @property
    def code(self) -> str | None:
        return self.reviewed_code or self.model_code

    @property
    def counted(self) -> bool:
        return self.code in COUNTED_CODES


def cells_of(result: Mapping[str, Any], labels: Mapping[str, str]) -> list[CellView]:
    out = []
    for image in result.get("images", []):
        for j, cell in enumerate(image.get("cells", [])):
            cell_id = f"{image['index']}.{j}"
            model_code = cell.get("cell_type") or (
                "RBC" if cell.get("detector_label") == "RBC" else None
            )
            x1, y1, x2, y2 = (float(v) for v in cell["box"])
            out.append(
                CellView(
                    id=cell_id,
                    image=int(image["index"]),
                    box=(x1, y1, x2, y2),
                    model_code=model_code,
                    confidence=cell.get("confidence"),
                    importance=cell.get("importance"),
                    attention=cell.get("attention"),
                    reviewed_code=labels.get(cell_id),
                )
            )
    return out


def differential_of(cells: Iterable[CellView], *, reviewed: bool) -> dict[str, DifferentialEntry]:
    return differential_of_codes(
        [c for c in ((x.code if reviewed else x.model_code) for x in cells) if c]
    )


def review_of(session: Session, analysis_id: str) -> CaseReview:
    """The case's review row (a fresh `in_review` one, not yet stored, when none exists)."""
    row = session.get(CaseReview, analysis_id)
    return row or CaseReview(
        analysis_id=analysis_id, revision=0, state="in_review", labels_json="{}", amendments=0
    )


def labels_of(review: CaseReview) -> dict[str, str]:
    return dict(json.loads(review.labels_json or "{}"))


def _writable(session: Session, analysis_id: str, revision: int) -> CaseReview:
    review = review_of(session, analysis_id)
    if review.revision != revision:
        raise StaleRevision(
            f"this case was changed by another reviewer (revision {review.revision}, you had "
            f"{revision}): reload it, your change was not saved"
        )
    return review


def _store(session: Session, review: CaseReview) -> None:
    review.revision += 1
    review.updated_at = now()
    session.merge(review)


def _audit(session: Session, who: ReviewerIdentity, action: str, analysis_id: str, detail: str):
    store.audit(
        session,
        key_id=None,
        key_name=f"reviewer:{who.username}",
        tenant=who.tenant,
        action=action,
        resource=f"analysis:{analysis_id}",
        detail=detail,
    )


def relabel(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    cell_ids: list[str],
    code: str,
    who: ReviewerIdentity,
) -> CaseReview:
    """Give `cell_ids` the label `code` (any taxonomy code: a counted type, or a non-counted
    one such as ART for an artefact / not-a-cell); the model's own code clears a
    correction. Refused whole when one id is unknown."""
    if code not in CODES:
        raise ReviewError(f"unknown cell type {code!r}; known: {', '.join(CODES)}")
    if not cell_ids:
        raise ReviewError("select at least one cell")
    review = _writable(session, analysis_id, revision)
    if review.state == "signed_out":
        raise ReviewError("the case is signed out: reopen it (with a reason) to change it")
    labels = labels_of(review)
    cells = {c.id: c for c in cells_of(result, labels)}
    unknown = [i for i in cell_ids if i not in cells]
    if unknown:
        raise ReviewError(f"no cell {', '.join(unknown[:5])} in this case")
    changes = []
    for cell_id in dict.fromkeys(cell_ids):
        before = cells[cell_id].code
        if code == cells[cell_id].model_code:
            labels.pop(cell_id, None)
        else:
            labels[cell_id] = code
        changes.append(f"{cell_id}: {before} -> {code}")
    review.labels_json = json.dumps(labels, sort_keys=True)
    _store(session, review)
    _audit(session, who, "review.relabel", analysis_id, "; ".join(changes))
    return review


def sign_out_record(session: Session, analysis_id: str) -> SignOut | None:
    """The case's sign-out as the reports read it (None while it is not signed out): the
    reviewer's name, when, the comment, and whether it amends an earlier sign-out."""
    review = session.get(CaseReview, analysis_id)
    if review is None or review.state != "signed_out" or review.signed_at is None:
        return None
    reviewer = session.get(Reviewer, review.signed_by) if review.signed_by else None
    return SignOut(
        reviewer=reviewer.display_name if reviewer else "unknown reviewer",
        signed_at=datetime.fromtimestamp(review.signed_at, UTC),
        comment=review.comment or "",
        amended=review.amendments > 0,
    )


def _notify(session: Session, analysis_id: str, event: str, hl7_tenants: Collection[str]) -> None:
    """Tell the LIS, in the sign-out's transaction: a webhook (when the analysis has one) and
    an ORU^R01 (when its tenant has an HL7 destination), both through the durable outboxes."""
    a = session.get(Analysis, analysis_id)
    if a is None:
        return
    if a.webhook_url:
        payload = {
            "event": f"analysis.{event}",
            "analysis_id": a.id,
            "tenant": a.tenant,
            "status": a.status,
            "signed_at": now(),
        }
        session.add(
            Outbox(
                analysis_id=a.id,
                url=a.webhook_url,
                payload=json.dumps(payload, sort_keys=True),
                next_attempt_at=now(),
            )
        )
    if a.tenant in hl7_tenants:
        hl7outbox.enqueue(session, analysis_id=a.id, tenant=a.tenant, event=event)


def sign_out(
    session: Session,
    *,
    analysis_id: str,
    revision: int,
    comment: str,
    who: ReviewerIdentity,
    hl7_tenants: Collection[str] = (),
) -> CaseReview:
    review = _writable(session, analysis_id, revision)
    if review.state == "signed_out":
        raise ReviewError("the case is signed out already")
    if len(comment) > MAX_COMMENT:
        raise ReviewError(f"the comment is longer than {MAX_COMMENT} characters")
    review.state = "signed_out"
    review.signed_by = who.id
    review.signed_at = now()
    review.comment = comment.strip() or None
    _store(session, review)
    _audit(session, who, "review.sign_out", analysis_id, f"amendment {review.amendments}")
    session.flush()
    _notify(session, analysis_id, "amended" if review.amendments else "signed_out", hl7_tenants)
    return review


def reopen(
    session: Session, *, analysis_id: str, revision: int, reason: str, who: ReviewerIdentity
) -> CaseReview:
    review = _writable(session, analysis_id, revision)
    if review.state != "signed_out":
        raise ReviewError("only a signed-out case can be reopened")
    if not reason.strip():
        raise ReviewError("reopening a signed-out case needs a reason (it becomes an amendment)")
    review.state = "in_review"
    review.amendments += 1
    _store(session, review)
    _audit(session, who, "review.reopen", analysis_id, reason.strip()[:MAX_COMMENT])
    return review
