"""`/v1/analyses`: submit, read, list, cancel and retry analyses.

Every route is scoped to the caller's tenant (admin keys: every tenant); another tenant's
analysis answers 404 exactly like one that does not exist.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile, status

from services.gateway import intake, store
from services.gateway.db import Analysis
from services.gateway.deps import (
    ReadKey,
    ServicesDep,
    SessionDep,
    SettingsDep,
    SubmitKey,
    audit,
    get_analysis,
    replay,
    submitter,
)
from services.gateway.errors import ApiError, error_responses
from services.gateway.schemas import (
    AnalysisAccepted,
    AnalysisPage,
    AnalysisPublic,
    ErrorPublic,
    ImagePublic,
    SlideProgress,
    ts,
)
from services.gateway.uploads import parse_metadata

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/analyses", tags=["analyses"])


def to_public(session, a: Analysis) -> AnalysisPublic:
    images = store.images_of(session, analysis_id=a.id)
    job = store.slide_job(session, analysis_id=a.id)
    return AnalysisPublic(
        id=a.id,
        status=a.status,
        accession_id=a.accession,
        specimen_type=a.specimen_type,
        stain=a.stain,
        created_at=ts(a.created_at),
        updated_at=ts(a.updated_at),
        started_at=ts(a.started_at),
        finished_at=ts(a.finished_at),
        stage=a.stage,
        reason=a.reason,
        cancel_requested=a.cancel_requested,
        images=[
            ImagePublic(
                index=i.idx,
                sha256=i.sha256,
                width=i.width,
                height=i.height,
                format=i.format,
                size_bytes=i.size_bytes,
            )
            for i in images
        ],
        slide=None
        if job is None
        else SlideProgress(
            phase="cut"
            if job.expanded_at is not None
            else store.SLIDE_STAGES.get(a.stage or "", "waiting"),
            regions_total=job.regions_total,
            regions_done=job.regions_done,
        ),
        result=store.result_of(session, analysis_id=a.id),
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AnalysisAccepted,
    responses={
        200: {
            "model": AnalysisAccepted,
            "description": "Idempotent replay: the analysis already exists",
        },
        **error_responses(401, 403, 409, 413, 422, 429),
        422: {
            "model": ErrorPublic,
            "description": "invalid_metadata, no_images, invalid_image, webhooks_disabled, "
            "webhook_url_refused, or not_a_cell_image (input cells: an image larger than "
            "MS_GATEWAY_MAX_CELL_IMAGE_PIXELS)",
        },
        413: {
            "model": ErrorPublic,
            "description": "image_too_large, too_many_images, case_too_large (pixels) or "
            "request_too_large (MS_GATEWAY_MAX_REQUEST_BYTES, checked before reading)",
        },
    },
)
def submit_analysis(
    principal: SubmitKey,
    services: ServicesDep,
    settings: SettingsDep,
    response: Response,
    images: Annotated[list[UploadFile], File(description="1..N PNG/JPEG/TIFF images")],
    metadata: Annotated[str, Form(description="JSON object, see AnalysisCreate")],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> AnalysisAccepted:
    """Accept a case. Images are decoded and validated now; on any bad input nothing is
    stored. Same Idempotency-Key + same content -> the same analysis (200); same key +
    different content -> 409. `"input": "cells"` in the metadata: each image is one cell
    (a single-cell export), up to MS_GATEWAY_MAX_CELL_IMAGES of them."""
    meta = parse_metadata(metadata, settings)
    checked = intake.check_images(images, settings, cells=meta.input == "cells")
    try:
        done = intake.submit(
            sessions=services.sessions,
            blobs=services.blobs,
            who=submitter(principal),
            metadata=meta.model_dump(mode="json"),
            images=checked,
            idempotency_key=idempotency_key,
            action="submit",
            detail=f"{len(checked)} images",
        )
    except store.Conflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    if done.replayed:
        return replay(services, principal, response, done.analysis_id)
    analysis_id = done.analysis_id
    log.info("accepted analysis %s (%d images)", analysis_id, len(checked))
    services.doorbell.ring()
    response.headers["Location"] = f"/v1/analyses/{analysis_id}"
    return AnalysisAccepted(id=analysis_id, status="queued", location=f"/v1/analyses/{analysis_id}")


@router.get("", response_model=AnalysisPage, responses=error_responses(401, 403, 429))
def list_analyses(
    principal: ReadKey,
    session: SessionDep,
    accession: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AnalysisPage:
    """Analyses of the caller's tenant (admin: all), newest first, optionally of one
    accession id."""
    rows, total = store.list_analyses(
        session,
        accession=accession,
        limit=limit,
        offset=offset,
        tenant=principal.visible_tenant,
    )
    page = AnalysisPage(
        items=[to_public(session, a) for a in rows], total=total, limit=limit, offset=offset
    )
    audit(session, principal, "list", detail=f"{len(rows)} of {total}")
    session.commit()  # nothing is read after it (see read_analysis)
    return page


@router.get(
    "/{analysis_id}", response_model=AnalysisPublic, responses=error_responses(401, 403, 404, 429)
)
def read_analysis(principal: ReadKey, session: SessionDep, analysis_id: str) -> AnalysisPublic:
    """Status and, once finished, the result (schema: `GET /v1/schemas/result`)."""
    a = get_analysis(session, analysis_id, principal)
    public = to_public(session, a)
    if a.status in store.FINAL_STATUSES:
        # The audit trail records who read an outcome. A poll of a queued or running
        # analysis returns only its status: writing (and fsyncing) an audit row for each
        # one cost the gateway a third of its CPU under load (bench/results/pipeline_load.md)
        # and buried the reads that matter among hundreds of status checks.
        audit(session, principal, "read", resource=a.id)
    # Read everything before the commit, and commit even with nothing written: a transaction
    # left open (SQLite: BEGIN IMMEDIATE, the write lock) lasts until the session dependency
    # is torn down, after the response; polls then stalled writers and other readers for up
    # to the 30 s busy timeout (a 30 s GET in the load-test smoke).
    session.commit()
    return public


@router.delete(
    "/{analysis_id}",
    response_model=AnalysisPublic,
    status_code=202,
    responses=error_responses(401, 403, 404, 409, 429),
)
def cancel_analysis(
    principal: SubmitKey, services: ServicesDep, analysis_id: str
) -> AnalysisPublic:
    """Cancel: a queued analysis at once, a running one at its next stage boundary."""
    with services.sessions.begin() as session:
        a = store.request_cancel(
            session,
            analysis_id=analysis_id,
            tenant=principal.visible_tenant,
            hl7_tenants=services.settings.hl7_destinations.keys(),
        )
        if a is None:
            raise ApiError(404, "not_found", f"no analysis {analysis_id}")
        if a.status in ("succeeded", "failed", "abstained"):
            raise ApiError(409, "already_finished", f"analysis is already {a.status}")
        audit(session, principal, "cancel", resource=a.id)
    with services.sessions() as session:
        return to_public(session, get_analysis(session, analysis_id, principal))


@router.post(
    "/{analysis_id}/retry",
    response_model=AnalysisPublic,
    status_code=202,
    responses=error_responses(401, 403, 404, 409, 429),
)
def retry_analysis(principal: SubmitKey, services: ServicesDep, analysis_id: str) -> AnalysisPublic:
    """Run a failed or cancelled analysis again: same id, same stored images, a fresh
    attempt count and requeue window; its webhook fires again when it finishes. 409 for an
    analysis that is queued, running or has a result. Audited."""
    with services.sessions.begin() as session:
        a = get_analysis(session, analysis_id, principal)
        detail = f"was {a.status}: {a.reason or ''}"[:500]
        if not store.retry(session, analysis_id=a.id):
            raise ApiError(
                409,
                "not_retryable",
                f"analysis is {a.status}; only failed or cancelled analyses can be retried",
            )
        audit(session, principal, "retry", resource=a.id, detail=detail)
        # the state this request produced (queued), read before the commit: an embedded
        # worker may claim the analysis the moment it is committed
        session.refresh(a)
        public = to_public(session, a)
    log.info("analysis %s requeued by an explicit retry", analysis_id)
    return public
