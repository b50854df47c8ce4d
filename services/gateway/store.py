"""Job-store operations (keyword-only service functions over a SQLAlchemy `Session`).

Claiming: PostgreSQL picks a candidate with `SELECT ... FOR UPDATE SKIP LOCKED`, so several
workers never wait on each other's rows; both databases then take it with a conditional
`UPDATE ... WHERE status='queued' OR (status='running' AND lease_until < now)` and check the
row count, so exactly one worker wins (on SQLite the `BEGIN IMMEDIATE` transaction makes the
claim single-writer). A worker holds a lease (`lease_until`), renews it with a heartbeat and
writes the outcome only while it still owns the lease; a crashed worker's analysis is taken
over after the lease expires.

Tenancy: every read, list, cancel and retry takes the caller's `tenant` (None = admin, every
tenant); an analysis of another tenant is simply not found, so ids do not leak existence.

Outages: a worker passes the model services that are down to `claim_next`, which takes only
an analysis that calls none of them (`Analysis.needs`: a single-cell case runs while npm1 is
down); the others wait in the queue, burning no attempts, until `fail_waited_too_long` fails
those still waiting past their requeue window. A worker whose analysis failed only because a
model service was unavailable puts it back in the queue (`requeue_or_fail`) with a
`not_before` time (exponential backoff) instead of failing it, until its requeue window since
`queued_at` has passed.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import ColumnElement, exists, false, func, not_, or_, select, true, update
from sqlalchemy.orm import Session

from services.gateway import hl7outbox
from services.gateway.db import (
    CORE_SERVICES,
    DEFAULT_TENANT,
    FINAL_STATUSES,
    NEEDS,
    Analysis,
    AuditLog,
    Idempotency,
    Image,
    Outbox,
    Result,
    SlideJob,
    new_id,
    now,
    optional_needs,
)

NO_RESULT = frozenset({"failed", "cancelled"})
"""Final statuses without a result; an HL7 tenant's LIS gets an ORU^R01 with OBR-25 X."""


class Conflict(Exception):
    """Same idempotency key, different content."""


@dataclass(frozen=True)
class NewImage:
    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str


def audit(
    session: Session,
    *,
    key_id: str | None,
    key_name: str | None,
    action: str,
    resource: str | None = None,
    detail: str | None = None,
    tenant: str | None = None,
) -> None:
    session.add(
        AuditLog(
            api_key_id=key_id,
            key_name=key_name,
            tenant=tenant,
            action=action,
            resource=resource,
            detail=detail,
        )
    )


def find_idempotent(session: Session, *, tenant: str, key: str, content_hash: str) -> str | None:
    """The analysis id `tenant` already created under `key`, None when new; Conflict on new
    content."""
    row = session.get(Idempotency, (tenant, key))
    if row is None:
        return None
    if row.content_hash != content_hash:
        raise Conflict("Idempotency-Key was already used with different content")
    return row.analysis_id


def _add_images(
    session: Session, analysis_id: str, images: list[NewImage], um_per_px: float | None
) -> None:
    """The analysis's image rows, indexed in order."""
    for k, im in enumerate(images):
        session.add(
            Image(
                analysis_id=analysis_id,
                idx=k,
                sha256=im.sha256,
                size_bytes=im.size_bytes,
                width=im.width,
                height=im.height,
                format=im.format,
                um_per_px=um_per_px,
            )
        )


def create_analysis(
    session: Session,
    *,
    metadata: dict,
    images: list[NewImage],
    content_hash: str,
    key_id: str | None,
    idempotency_key: str | None,
    tenant: str = DEFAULT_TENANT,
) -> Analysis:
    t = now()
    needs = optional_needs(metadata)
    analysis = Analysis(
        id=new_id(),
        status="queued",
        accession=metadata["accession_id"],
        specimen_type=metadata["specimen_type"],
        stain=metadata["stain"],
        metadata_json=json.dumps(metadata, sort_keys=True),
        content_hash=content_hash,
        webhook_url=metadata.get("webhook_url"),
        api_key_id=key_id,
        tenant=tenant,
        n_images=len(images),
        cancel_requested=False,
        attempts=0,
        requeues=0,
        created_at=t,
        updated_at=t,
        queued_at=t,
        **{column.key: service in needs for service, column in NEEDS.items()},
    )
    session.add(analysis)
    session.flush()
    _add_images(session, analysis.id, images, metadata.get("options", {}).get("um_per_px"))
    if idempotency_key is not None and key_id is not None:
        session.add(
            Idempotency(
                tenant=tenant,
                api_key_id=key_id,
                key=idempotency_key,
                content_hash=content_hash,
                analysis_id=analysis.id,
            )
        )
    session.flush()
    return analysis


def images_of(session: Session, *, analysis_id: str) -> list[Image]:
    return list(
        session.scalars(select(Image).where(Image.analysis_id == analysis_id).order_by(Image.idx))
    )


def result_of(session: Session, *, analysis_id: str) -> dict | None:
    row = session.get(Result, analysis_id)
    return None if row is None else json.loads(row.result_json)


# -- whole slides ------------------------------------------------------------------------------
def add_slide_job(session: Session, *, analysis_id: str, source: dict) -> SlideJob:
    job = SlideJob(analysis_id=analysis_id, source_json=json.dumps(source, sort_keys=True))
    session.add(job)
    return job


def slide_job(session: Session, *, analysis_id: str) -> SlideJob | None:
    return session.get(SlideJob, analysis_id)


def _owned(session: Session, analysis_id: str, owner: str) -> Analysis | None:
    a = session.get(Analysis, analysis_id)
    if a is None or a.lease_owner != owner or a.status != "running":
        return None
    return a


SLIDE_STAGES = {"slide_scoring": "scoring", "slide_tiles": "cutting"}
"""The analysis stages of a slide's preparation and the progress phase each reports."""


def slide_progress(
    session: Session, *, analysis_id: str, owner: str, done: int, total: int, stage: str
) -> tuple[bool, bool]:
    """Record `done` of `total` regions scored (stage `slide_scoring`) or cut into tiles
    (`slide_tiles`); returns (still owned, cancel requested)."""
    a = _owned(session, analysis_id, owner)
    job = session.get(SlideJob, analysis_id)
    if a is None or job is None:
        return False, False
    job.regions_done, job.regions_total = done, total
    a.stage, a.updated_at = stage, now()
    return True, bool(a.cancel_requested)


def attach_tiles(
    session: Session,
    *,
    analysis_id: str,
    owner: str,
    tiles: list[NewImage],
    um_per_px: float | None,
    selection: dict,
    thumbnail_sha256: str,
) -> bool:
    """The slide's tiles become the analysis's images (once: a retaken analysis whose slide
    was already cut keeps its tiles); False when the lease was lost."""
    a = _owned(session, analysis_id, owner)
    job = session.get(SlideJob, analysis_id)
    if a is None or job is None:
        return False
    if job.expanded_at is not None:
        return True
    _add_images(session, analysis_id, tiles, um_per_px)
    a.n_images = len(tiles)
    job.selection_json = json.dumps(selection, sort_keys=True)
    job.thumbnail_sha256 = thumbnail_sha256
    job.regions_done = job.regions_total = len(tiles)
    job.expanded_at = now()
    return True


def get_analysis(session: Session, *, analysis_id: str, tenant: str | None) -> Analysis | None:
    """The analysis when it exists and `tenant` (None: any) may see it, else None."""
    a = session.get(Analysis, analysis_id)
    if a is None or (tenant is not None and a.tenant != tenant):
        return None
    return a


def list_analyses(
    session: Session,
    *,
    accession: str | None,
    limit: int,
    offset: int,
    tenant: str | None = None,
) -> tuple[list[Analysis], int]:
    """Analyses of `tenant` (None: every tenant), newest first, with the total count."""
    q = select(Analysis)
    if tenant is not None:
        q = q.where(Analysis.tenant == tenant)
    if accession is not None:
        q = q.where(Analysis.accession == accession)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(
        q.order_by(Analysis.created_at.desc(), Analysis.id).limit(limit).offset(offset)
    )
    return list(rows), total


def request_cancel(
    session: Session,
    *,
    analysis_id: str,
    tenant: str | None = None,
    hl7_tenants: Collection[str] = (),
) -> Analysis | None:
    """Queued -> cancelled now; running -> flagged (the worker stops at its next stage
    boundary); final states are returned unchanged. None when `tenant` cannot see it."""
    a = get_analysis(session, analysis_id=analysis_id, tenant=tenant)
    if a is None or a.status in FINAL_STATUSES:
        return a
    if a.status == "queued":
        _finish(
            session, a, status="cancelled", reason="cancelled by request", hl7_tenants=hl7_tenants
        )
    else:
        a.cancel_requested = True
        a.updated_at = now()
    return a


RETRYABLE = frozenset({"failed", "cancelled"})


def retry(session: Session, *, analysis_id: str) -> bool:
    """Put a failed or cancelled analysis back in the queue, same id and images, with a fresh
    attempt count and requeue window. One conditional UPDATE, so two concurrent retries (or a
    retry racing a worker) requeue it once; False when it was not failed/cancelled."""
    t = now()
    res = session.execute(
        update(Analysis)
        .where(Analysis.id == analysis_id, Analysis.status.in_(RETRYABLE))
        .values(
            status="queued",
            reason=None,
            stage=None,
            attempts=0,
            requeues=0,
            not_before=None,
            cancel_requested=False,
            lease_owner=None,
            lease_until=None,
            heartbeat_at=None,
            started_at=None,
            finished_at=None,
            queued_at=t,
            updated_at=t,
        )
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Analysis.status, func.count()).group_by(Analysis.status))
    return {s: n for s, n in rows}


# ---- workers -------------------------------------------------------------------------------


def _needs_any(services: frozenset[str]) -> ColumnElement[bool]:
    """SQL: the analysis calls at least one of `services` (`Analysis.needs` as a filter)."""
    if services & CORE_SERVICES:
        return true()
    return or_(false(), *(column for s, column in NEEDS.items() if s in services))


Lane = Literal["cases", "slides"]
"""Worker slots: `slides` only prepare whole slides not cut yet (scoring, cutting), `cases`
take everything else, so a slide being prepared never holds a slot images wait for."""


def _slide_to_cut() -> ColumnElement[bool]:
    """SQL: the analysis is a whole slide whose tiles are not cut yet."""
    return exists().where(SlideJob.analysis_id == Analysis.id, SlideJob.expanded_at.is_(None))


def _claimable(t: float, down: frozenset[str], lane: Lane | None) -> ColumnElement[bool]:
    queued = (Analysis.status == "queued") & (
        Analysis.not_before.is_(None) | (Analysis.not_before <= t)
    )
    taken_over = (Analysis.status == "running") & (Analysis.lease_until < t)
    claimable = or_(queued, taken_over) & not_(_needs_any(down))
    if lane == "slides":
        return claimable & _slide_to_cut()
    if lane == "cases":
        return claimable & not_(_slide_to_cut())
    return claimable


def claim_next(
    session: Session,
    *,
    owner: str,
    lease_s: float,
    down: frozenset[str] = frozenset(),
    lane: Lane | None = None,
) -> Analysis | None:
    """Take the oldest queued (or lease-expired) analysis for `owner` that calls none of the
    model services `down` and belongs to `lane` (None: any), or None."""
    t = now()
    q = select(Analysis.id).where(_claimable(t, down, lane)).order_by(Analysis.created_at).limit(1)
    if session.bind.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    analysis_id = session.scalar(q)
    if analysis_id is None:
        return None
    res = session.execute(
        update(Analysis)
        .where(Analysis.id == analysis_id, _claimable(t, down, lane))
        .values(
            status="running",
            lease_owner=owner,
            lease_until=t + lease_s,
            heartbeat_at=t,
            attempts=Analysis.attempts + 1,
            started_at=t,
            updated_at=t,
            stage="claimed",
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    a = session.get(Analysis, analysis_id)
    session.refresh(a)
    return a


def heartbeat(
    session: Session, *, analysis_id: str, owner: str, lease_s: float, stage: str | None = None
) -> tuple[bool, bool]:
    """Extend the lease; returns (still owned, cancel requested)."""
    t = now()
    values = {"lease_until": t + lease_s, "heartbeat_at": t, "updated_at": t}
    if stage is not None:
        values["stage"] = stage
    res = session.execute(
        update(Analysis)
        .where(
            Analysis.id == analysis_id, Analysis.lease_owner == owner, Analysis.status == "running"
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return False, False
    return True, bool(
        session.scalar(select(Analysis.cancel_requested).where(Analysis.id == analysis_id))
    )


def _finish(
    session: Session,
    a: Analysis,
    *,
    status: str,
    reason: str | None,
    hl7_tenants: Collection[str] = (),
) -> None:
    t = now()
    a.status, a.reason, a.finished_at, a.updated_at = status, reason, t, t
    a.lease_owner, a.lease_until = None, None
    if a.webhook_url:
        payload = {
            "event": f"analysis.{status}",
            "analysis_id": a.id,
            "tenant": a.tenant,
            "status": status,
            "reason": reason,
            "finished_at": t,
        }
        session.add(
            Outbox(
                analysis_id=a.id,
                url=a.webhook_url,
                payload=json.dumps(payload, sort_keys=True),
                next_attempt_at=t,
            )
        )
    if status in NO_RESULT and a.tenant in hl7_tenants:  # the LIS hears of it too (OBR-25 X)
        hl7outbox.enqueue(session, analysis_id=a.id, tenant=a.tenant, event=status)


def finish(
    session: Session,
    *,
    analysis_id: str,
    owner: str | None,
    status: str,
    reason: str | None = None,
    result: dict | None = None,
    schema_version: str | None = None,
    hl7_tenants: Collection[str] = (),
) -> bool:
    """Write the outcome (and the webhook outbox row) in one transaction; only the lease
    owner may (owner None: unconditional, for housekeeping). False when the lease was lost.
    A result of a tenant in `hl7_tenants` (those with an HL7 destination) also gets its
    ORU^R01 outbox row (`hl7outbox`), in the same transaction; so does an analysis of such a
    tenant that failed or was cancelled without a result (event `failed` / `cancelled`)."""
    a = session.get(Analysis, analysis_id, with_for_update=True)
    if a is None or a.status in FINAL_STATUSES:
        return False
    if owner is not None and (a.lease_owner != owner or a.status != "running"):
        return False
    if result is not None:
        session.merge(
            Result(
                analysis_id=analysis_id,
                schema_version=schema_version or "",
                result_json=json.dumps(result),
            )
        )
    _finish(
        session, a, status=status, reason=reason, hl7_tenants=hl7_tenants if result is None else ()
    )
    if result is not None and a.tenant in hl7_tenants:
        hl7outbox.enqueue(session, analysis_id=a.id, tenant=a.tenant, event="finished")
    return True


def fail_exhausted(
    session: Session, *, max_attempts: int, hl7_tenants: Collection[str] = ()
) -> list[str]:
    """Analyses whose lease expired after `max_attempts` claims: fail them instead of
    handing them to yet another worker (a poison job must not crash workers forever)."""
    t = now()
    rows = list(
        session.scalars(
            select(Analysis).where(
                Analysis.status == "running",
                Analysis.lease_until < t,
                Analysis.attempts >= max_attempts,
            )
        )
    )
    for a in rows:
        _finish(
            session,
            a,
            status="failed",
            reason=f"worker lost {a.attempts} times (crash or timeout); not retried again",
            hl7_tenants=hl7_tenants,
        )
    return [a.id for a in rows]


def release(
    session: Session,
    *,
    analysis_id: str,
    owner: str,
    delay_s: float = 0.0,
    stage: str | None = None,
) -> bool:
    """Hand a claimed analysis back to the queue without counting the claim (the worker
    stops, a service it needs is down, or its slide is cut and a case slot takes it on),
    claimable again after `delay_s`."""
    t = now()
    res = session.execute(
        update(Analysis)
        .where(
            Analysis.id == analysis_id,
            Analysis.lease_owner == owner,
            Analysis.status == "running",
        )
        .values(
            status="queued",
            lease_owner=None,
            lease_until=None,
            updated_at=t,
            stage=stage,
            not_before=t + delay_s if delay_s > 0 else None,
            attempts=Analysis.attempts - 1,
        )
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def requeue_backoff_s(requeues: int, *, base: float, cap: float) -> float:
    """Delay before the `requeues`-th requeue (1-based) may be claimed: base * 2^(n-1), capped."""
    return min(cap, base * 2 ** max(0, requeues - 1))


def requeue_or_fail(
    session: Session,
    *,
    analysis_id: str,
    owner: str,
    reason: str,
    window_s: float,
    backoff_s: float,
    backoff_max_s: float,
    hl7_tenants: Collection[str] = (),
) -> str | None:
    """After a transient failure (a model service unavailable or too slow): back to the queue
    with a backoff while the analysis is inside its requeue window (from `queued_at`), else
    failed. Returns "queued" or "failed", None when this worker no longer owns it."""
    a = session.get(Analysis, analysis_id, with_for_update=True)
    if a is None or a.status != "running" or a.lease_owner != owner:
        return None
    t = now()
    n = a.requeues + 1
    delay = requeue_backoff_s(n, base=backoff_s, cap=backoff_max_s)
    start = a.queued_at or a.created_at
    if t + delay > start + window_s:
        _finish(
            session,
            a,
            status="failed",
            reason=f"{reason}; still failing {t - start:.0f} s after it was queued "
            f"({a.requeues} requeues), not retried again",
            hl7_tenants=hl7_tenants,
        )
        return "failed"
    a.status, a.stage, a.requeues = "queued", "waiting_for_services", n
    a.reason = f"requeued ({n}) after: {reason}"
    a.not_before, a.updated_at = t + delay, t
    a.lease_owner = a.lease_until = None
    a.attempts = max(0, a.attempts - 1)  # an outage is not a worker crash
    return "queued"


def fail_waited_too_long(
    session: Session,
    *,
    window_s: float,
    down: frozenset[str],
    hl7_tenants: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Queued analyses that call a model service `down` and whose requeue window has passed:
    fail them rather than keep the LIS waiting (an analysis that needs none of them is
    claimable and left alone). Returns (analysis id, reason) of each."""
    t = now()
    start = func.coalesce(Analysis.queued_at, Analysis.created_at)
    rows = list(
        session.scalars(
            select(Analysis).where(
                Analysis.status == "queued", start + window_s < t, _needs_any(down)
            )
        )
    )
    failed = []
    for a in rows:
        waited_for = ", ".join(sorted(a.needs & down))
        reason = (
            f"model service(s) {waited_for} not ready for longer than the requeue window "
            f"({window_s:g} s); POST /v1/analyses/{a.id}/retry once it is back"
        )
        _finish(session, a, status="failed", reason=reason, hl7_tenants=hl7_tenants)
        failed.append((a.id, reason))
    return failed


def uploads_in_use(session: Session) -> set[tuple[str, str]]:
    """(tenant, upload id) of every upload a queued or running analysis has not cut yet: the
    uploads that must not expire (once cut, the tiles are blobs of their own)."""
    rows = session.execute(
        select(Analysis.tenant, SlideJob.source_json)
        .join(SlideJob, SlideJob.analysis_id == Analysis.id)
        .where(Analysis.status.in_(("queued", "running")), SlideJob.expanded_at.is_(None))
    )
    out = set()
    for tenant, source_json in rows:
        upload = json.loads(source_json).get("upload")
        if upload:
            out.add((tenant, upload))
    return out


def referenced_blobs(session: Session) -> set[str]:
    """Every sha256 the job store points at: images (slide tiles included), result artifacts
    (heatmaps) and slide thumbnails."""
    refs = set(session.scalars(select(Image.sha256)))
    refs.update(s for s in session.scalars(select(SlideJob.thumbnail_sha256)) if s is not None)
    for text_ in session.scalars(select(Result.result_json)):
        for entry in json.loads(text_).get("images", []):
            if entry.get("heatmap_sha256"):
                refs.add(entry["heatmap_sha256"])
    return refs


# ---- outbox --------------------------------------------------------------------------------


def claim_outbox(session: Session, *, lease_s: float, limit: int = 10) -> list[Outbox]:
    t = now()
    q = (
        select(Outbox)
        .where(
            Outbox.status == "pending",
            Outbox.next_attempt_at <= t,
            or_(Outbox.lease_until.is_(None), Outbox.lease_until < t),
        )
        .order_by(Outbox.next_attempt_at)
        .limit(limit)
    )
    if session.bind.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = list(session.scalars(q))
    for r in rows:
        r.lease_until = t + lease_s
    return rows


def outbox_result(
    session: Session, *, outbox_id: str, ok: bool, error: str | None, next_attempt_at: float | None
) -> None:
    row = session.get(Outbox, outbox_id)
    if row is None:
        return
    row.attempts += 1
    row.lease_until = None
    if ok:
        row.status, row.delivered_at, row.last_error = "delivered", now(), None
    else:
        row.last_error = (error or "")[:500]
        if next_attempt_at is None:
            row.status = "dead"
        else:
            row.next_attempt_at = next_attempt_at
