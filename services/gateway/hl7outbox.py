"""The HL7 outbox table's operations: enqueue with the result, claim in order, record an answer.

At least once, never reordered per analysis: a row is claimed only when no earlier row
(lower `seq`) of the same analysis is still pending, and a message is rendered once and
re-sent byte for byte (same MSH-10 control id) until the receiver accepts it, so a receiver
deduplicates on MSH-10. Every exchange is written to the audit log (`hl7_send`). The
dispatcher that sends the rows is `services.gateway.hl7delivery`.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased

from services.gateway.db import AuditLog, Hl7Outbox, now

Outcome = Literal["delivered", "retry", "parked"]


def enqueue(session: Session, *, analysis_id: str, tenant: str, event: str) -> None:
    """An ORU^R01 for `event` of the analysis, after every earlier one (`seq`)."""
    last = session.scalar(
        select(func.max(Hl7Outbox.seq)).where(Hl7Outbox.analysis_id == analysis_id)
    )
    session.add(
        Hl7Outbox(
            analysis_id=analysis_id,
            tenant=tenant,
            event=event,
            seq=(last or 0) + 1,
            next_attempt_at=now(),
        )
    )


def claim(session: Session, *, lease_s: float, limit: int = 10) -> list[Hl7Outbox]:
    """Due pending rows whose analysis has no earlier pending row, leased for `lease_s`."""
    t = now()
    earlier = aliased(Hl7Outbox)
    blocked = (
        select(earlier.id)
        .where(
            earlier.analysis_id == Hl7Outbox.analysis_id,
            earlier.seq < Hl7Outbox.seq,
            earlier.status == "pending",
        )
        .exists()
    )
    q = (
        select(Hl7Outbox)
        .where(
            Hl7Outbox.status == "pending",
            Hl7Outbox.next_attempt_at <= t,
            or_(Hl7Outbox.lease_until.is_(None), Hl7Outbox.lease_until < t),
            ~blocked,
        )
        .order_by(Hl7Outbox.created_at, Hl7Outbox.seq)
        .limit(limit)
    )
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = list(session.scalars(q))
    for row in rows:
        row.lease_until = t + lease_s
    return rows


def record(
    session: Session,
    *,
    outbox_id: str,
    outcome: Outcome,
    control_id: str | None,
    message: str | None,
    ack: str | None,
    error: str | None,
    next_attempt_at: float | None = None,
    error_answer: bool = False,
) -> None:
    """One attempt's outcome, and its audit entry (the control id and the ACK's MSA)."""
    row = session.get(Hl7Outbox, outbox_id)
    if row is None:
        return
    row.attempts += 1
    row.lease_until = None
    row.control_id = control_id or row.control_id
    row.message = message or row.message
    row.ack = ack or row.ack
    row.last_error = (error or "")[:500] or None
    if error_answer:
        row.error_answers += 1
    if outcome == "delivered":
        row.status, row.delivered_at = "delivered", now()
    elif outcome == "parked":
        row.status = "parked"
    else:
        row.next_attempt_at = next_attempt_at if next_attempt_at is not None else now()
    detail = f"{row.event} msh10={row.control_id} attempt={row.attempts} {outcome}"
    if error:
        detail += f": {error}"
    session.add(
        AuditLog(
            key_name="hl7-outbox",
            tenant=row.tenant,
            action="hl7_send",
            resource=row.analysis_id,
            detail=detail[:1000],
        )
    )


def requeue(session: Session, *, outbox_id: str) -> bool:
    """A parked message back to pending (after a person fixed its cause); False if none."""
    row = session.get(Hl7Outbox, outbox_id)
    if row is None or row.status != "parked":
        return False
    row.status, row.next_attempt_at, row.error_answers = "pending", now(), 0
    return True
