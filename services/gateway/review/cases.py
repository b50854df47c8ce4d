"""A case under review: the reviewer's actions on it (relabel cells, draw a missed cell,
exclude an image or a region, declare a field's boxes complete or clear that, sign out,
reopen), each in the caller's transaction.

The model's result is never changed: what the reviewer did lives beside it in the
`case_reviews` row (`services.gateway.review.cells` says how, and computes the cells and the
reviewed differential from it). A cell id is `<image index>.<cell index>` in the stored
result, `<image index>.a<n>` for a drawn cell.

States: `in_review` (the default; corrections allowed) -> `signed_out` (final; no edits)
-> reopened with a reason (`in_review` again, `amendments` + 1) -> `signed_out` again,
which the reports call amended. Every change needs the revision the reviewer last saw;
a stale one raises `StaleRevision` and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from marrowscope.taxonomy import CODES
from services.gateway import hl7outbox, store
from services.gateway.db import Analysis, CaseReview, Outbox, Reviewer, now
from services.gateway.reading import SignOut
from services.gateway.review.accounts import ReviewerIdentity
from services.gateway.review.cells import (
    AddedCell,
    CellView,
    CompleteMark,
    Exclusion,
    added_from,
    cells_of,
    checked_box,
    complete_from,
    exclusions_from,
    image_sizes,
    labels_from,
    next_id,
)

REVIEWABLE_STATUSES = frozenset({"succeeded", "abstained"})
MAX_COMMENT = 4000


class ReviewError(ValueError):
    """A change that cannot be made (unknown cell or label, signed-out case, no result)."""


class StaleRevision(ReviewError):
    """Another reviewer changed the case since this reviewer loaded it."""


def review_of(session: Session, analysis_id: str) -> CaseReview:
    """The case's review row (a fresh `in_review` one, not yet stored, when none exists)."""
    row = session.get(CaseReview, analysis_id)
    return row or CaseReview(
        analysis_id=analysis_id,
        revision=0,
        state="in_review",
        labels_json="{}",
        added_json="[]",
        excluded_json="[]",
        complete_json="[]",
        amendments=0,
    )


def labels_of(review: CaseReview) -> dict[str, str]:
    return labels_from(review.labels_json)


def case_cells(review: CaseReview, result: Mapping[str, Any]) -> list[CellView]:
    """Every cell of the case as reviewed so far (labels, drawn cells, exclusions)."""
    return cells_of(
        result,
        labels_of(review),
        added_from(review.added_json),
        exclusions_from(review.excluded_json),
    )


def _writable(session: Session, analysis_id: str, revision: int) -> CaseReview:
    review = review_of(session, analysis_id)
    if review.revision != revision:
        raise StaleRevision(
            f"this case was changed by another reviewer (revision {review.revision}, you had "
            f"{revision}): reload it, your change was not saved"
        )
    return review


def _editable(session: Session, analysis_id: str, revision: int) -> CaseReview:
    review = _writable(session, analysis_id, revision)
    if review.state == "signed_out":
        raise ReviewError("the case is signed out: reopen it (with a reason) to change it")
    return review


def _store(session: Session, review: CaseReview) -> None:
    review.revision += 1
    review.updated_at = now()
    session.merge(review)


def _audit(
    session: Session, who: ReviewerIdentity, action: str, analysis_id: str, detail: str
) -> None:
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
    review = _editable(session, analysis_id, revision)
    labels = labels_of(review)
    cells = {c.id: c for c in case_cells(review, result)}
    unknown = [i for i in cell_ids if i not in cells]
    if unknown:
        raise ReviewError(f"no cell {', '.join(unknown[:5])} in this case")
    changes = []
    for cell_id in dict.fromkeys(cell_ids):
        before = cells[cell_id].code
        if code == cells[cell_id].model_code or (
            cells[cell_id].added and code == _drawn_code(review, cell_id)
        ):
            labels.pop(cell_id, None)
        else:
            labels[cell_id] = code
        changes.append(f"{cell_id}: {before} -> {code}")
    review.labels_json = json.dumps(labels, sort_keys=True)
    _store(session, review)
    _audit(session, who, "review.relabel", analysis_id, "; ".join(changes))
    return review


def _drawn_code(review: CaseReview, cell_id: str) -> str | None:
    return next((a.code for a in added_from(review.added_json) if a.id == cell_id), None)


def add_cell(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    image: int,
    box: Sequence[float],
    code: str,
    who: ReviewerIdentity,
) -> CellView:
    """Add a cell the detector missed: `box` (x1, y1, x2, y2 pixels) inside image `image`,
    labelled `code` (a taxonomy code). Returns the new cell."""
    if code not in CODES:
        raise ReviewError(f"unknown cell type {code!r}; known: {', '.join(CODES)}")
    try:
        checked = checked_box(result, image, box, what="cell's box")
    except ValueError as exc:
        raise ReviewError(str(exc)) from None
    review = _editable(session, analysis_id, revision)
    added = added_from(review.added_json)
    cell = AddedCell(
        id=f"{image}.a{next_id('.a', (a.id for a in added))}",
        image=image,
        box=checked,
        code=code,
        by=who.username,
        at=now(),
    )
    review.added_json = json.dumps([a.to_json() for a in [*added, cell]])
    _store(session, review)
    _audit(
        session,
        who,
        "review.add_cell",
        analysis_id,
        f"{cell.id}: none -> {code} at image {image} box [{', '.join(f'{v:.0f}' for v in checked)}]",
    )
    return next(c for c in case_cells(review, result) if c.id == cell.id)


def exclude(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    image: int,
    box: Sequence[float] | None,
    who: ReviewerIdentity,
) -> Exclusion:
    """Leave image `image` (`box` None) or the cells of a region of it (their centres inside
    `box`) out of the reviewed differential; the model's figures keep them."""
    if image not in image_sizes(result):
        raise ReviewError(f"no image {image} in this case")
    try:
        checked = None if box is None else checked_box(result, image, box, what="region")
    except ValueError as exc:
        raise ReviewError(str(exc)) from None
    review = _editable(session, analysis_id, revision)
    exclusions = exclusions_from(review.excluded_json)
    if any(x.image == image and x.box is None for x in exclusions):
        raise ReviewError(f"image {image} is excluded already")
    before = {c.id for c in case_cells(review, result) if not c.excluded}
    exclusion = Exclusion(
        id=f"x{next_id('x', (x.id for x in exclusions))}",
        image=image,
        box=checked,
        by=who.username,
        at=now(),
    )
    review.excluded_json = json.dumps([x.to_json() for x in [*exclusions, exclusion]])
    after = {c.id for c in case_cells(review, result) if not c.excluded}
    _store(session, review)
    _audit(
        session,
        who,
        "review.exclude",
        analysis_id,
        f"{exclusion.id}: counted -> excluded: {exclusion.describe()} "
        f"({len(before - after)} cells)",
    )
    return exclusion


def include(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    exclusion_id: str,
    who: ReviewerIdentity,
) -> None:
    """Undo an exclusion: its cells count again (unless another exclusion covers them)."""
    review = _editable(session, analysis_id, revision)
    exclusions = exclusions_from(review.excluded_json)
    gone = next((x for x in exclusions if x.id == exclusion_id), None)
    if gone is None:
        raise ReviewError(f"no exclusion {exclusion_id} in this case")
    review.excluded_json = json.dumps([x.to_json() for x in exclusions if x is not gone])
    _store(session, review)
    _audit(
        session,
        who,
        "review.include",
        analysis_id,
        f"{gone.id}: excluded -> counted: {gone.describe()}",
    )


def mark_complete(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    image: int,
    who: ReviewerIdentity,
) -> CompleteMark:
    """The reviewer's word that every cell of field `image` is boxed (missed ones drawn,
    non-cells labelled ART), which makes the field a detection target in the corrections
    export. Editing the field's cells afterwards keeps the mark; clearing it is its own
    action. A single-cell case has no fields, and an excluded field is not a target."""
    if result.get("input") == "cells":
        raise ReviewError("a single-cell case has no fields whose boxes could be complete")
    if image not in image_sizes(result):
        raise ReviewError(f"no image {image} in this case")
    review = _editable(session, analysis_id, revision)
    marks = complete_from(review.complete_json)
    if any(m.image == image for m in marks):
        raise ReviewError(f"the boxes of image {image} are marked complete already")
    if any(x.image == image and x.box is None for x in exclusions_from(review.excluded_json)):
        raise ReviewError(
            f"image {image} is excluded: count it again before marking its boxes complete"
        )
    mark = CompleteMark(image=image, by=who.username, at=now())
    review.complete_json = json.dumps([m.to_json() for m in [*marks, mark]])
    boxes = [c for c in case_cells(review, result) if c.image == image]
    _store(session, review)
    _audit(
        session,
        who,
        "review.mark_complete",
        analysis_id,
        f"image {image}: boxes incomplete -> complete ({len(boxes)} boxes, "
        f"{sum(c.added for c in boxes)} drawn)",
    )
    return mark


def clear_complete(
    session: Session,
    *,
    analysis_id: str,
    result: Mapping[str, Any],
    revision: int,
    image: int,
    who: ReviewerIdentity,
) -> None:
    """Withdraw `mark_complete` for field `image`: it is no detection target any more."""
    if image not in image_sizes(result):
        raise ReviewError(f"no image {image} in this case")
    review = _editable(session, analysis_id, revision)
    marks = complete_from(review.complete_json)
    if not any(m.image == image for m in marks):
        raise ReviewError(f"the boxes of image {image} are not marked complete")
    review.complete_json = json.dumps([m.to_json() for m in marks if m.image != image])
    _store(session, review)
    _audit(
        session,
        who,
        "review.clear_complete",
        analysis_id,
        f"image {image}: boxes complete -> incomplete",
    )


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
