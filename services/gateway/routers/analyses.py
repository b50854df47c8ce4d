"""`/v1/analyses`: submit, read, list and cancel analyses."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile, status
from sqlalchemy.exc import IntegrityError

from services.gateway import store
from services.gateway.db import Analysis
from services.gateway.deps import ReadKey, ServicesDep, SessionDep, SettingsDep, SubmitKey
from services.gateway.errors import ApiError, error_responses
from services.gateway.schemas import (
    AnalysisAccepted,
    AnalysisPage,
    AnalysisPublic,
    ErrorPublic,
    ImagePublic,
    ts,
)
from services.gateway.uploads import check_uploads, content_hash, parse_metadata

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/analyses", tags=["analyses"])


def to_public(session, a: Analysis) -> AnalysisPublic:
    images = store.images_of(session, analysis_id=a.id)
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
        result=store.result_of(session, analysis_id=a.id),
    )


def get_analysis(session, analysis_id: str) -> Analysis:
    a = session.get(Analysis, analysis_id)
    if a is None:
        raise ApiError(404, "not_found", f"no analysis {analysis_id}")
    return a


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
    different content -> 409."""
    meta = parse_metadata(metadata, settings)
    if not images:
        raise ApiError(422, "no_images", "at least one image is required")
    if len(images) > settings.max_images:
        raise ApiError(
            413,
            "too_many_images",
            f"{len(images)} images; at most {settings.max_images} per analysis",
        )
    checked = check_uploads(images, settings)
    meta_doc = meta.model_dump(mode="json")
    digest = content_hash(meta_doc, checked)

    def replay(analysis_id: str) -> AnalysisAccepted:
        response.status_code = status.HTTP_200_OK
        response.headers["Location"] = f"/v1/analyses/{analysis_id}"
        response.headers["Idempotent-Replayed"] = "true"
        with services.sessions() as session:
            a = get_analysis(session, analysis_id)
            return AnalysisAccepted(id=a.id, status=a.status, location=f"/v1/analyses/{a.id}")

    if idempotency_key:
        with services.sessions() as session:
            existing = _find(session, principal.key_id, idempotency_key, digest)
        if existing:
            return replay(existing)

    created = [sha for sha, new in (services.blobs.put(c.data) for c in checked) if new]
    try:
        with services.sessions.begin() as session:
            a = store.create_analysis(
                session,
                metadata=meta_doc,
                content_hash=digest,
                key_id=principal.key_id,
                idempotency_key=idempotency_key,
                images=[
                    store.NewImage(c.sha256, len(c.data), c.width, c.height, c.format)
                    for c in checked
                ],
            )
            store.audit(
                session,
                key_id=principal.key_id,
                key_name=principal.name,
                action="submit",
                resource=a.id,
                detail=f"{len(checked)} images",
            )
            analysis_id = a.id
    except IntegrityError:
        for sha in created:
            services.blobs.delete(sha)
        if idempotency_key:  # a concurrent request with the same key won the race
            with services.sessions() as session:
                existing = _find(session, principal.key_id, idempotency_key, digest)
            if existing:
                return replay(existing)
        raise
    except BaseException:
        for sha in created:
            services.blobs.delete(sha)
        raise
    log.info("accepted analysis %s (%d images)", analysis_id, len(checked))
    response.headers["Location"] = f"/v1/analyses/{analysis_id}"
    return AnalysisAccepted(id=analysis_id, status="queued", location=f"/v1/analyses/{analysis_id}")


def _find(session, key_id: str, key: str, digest: str) -> str | None:
    try:
        return store.find_idempotent(session, key_id=key_id, key=key, content_hash=digest)
    except store.Conflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None


@router.get("", response_model=AnalysisPage, responses=error_responses(401, 403, 429))
def list_analyses(
    principal: ReadKey,
    session: SessionDep,
    accession: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AnalysisPage:
    """Analyses, newest first, optionally of one accession id."""
    rows, total = store.list_analyses(session, accession=accession, limit=limit, offset=offset)
    page = AnalysisPage(
        items=[to_public(session, a) for a in rows], total=total, limit=limit, offset=offset
    )
    store.audit(
        session,
        key_id=principal.key_id,
        key_name=principal.name,
        action="list",
        detail=f"{len(rows)} of {total}",
    )
    session.commit()  # nothing is read after it (see read_analysis)
    return page


@router.get(
    "/{analysis_id}", response_model=AnalysisPublic, responses=error_responses(401, 403, 404, 429)
)
def read_analysis(principal: ReadKey, session: SessionDep, analysis_id: str) -> AnalysisPublic:
    """Status and, once finished, the result (schema: `GET /v1/schemas/result`)."""
    a = get_analysis(session, analysis_id)
    public = to_public(session, a)
    store.audit(
        session, key_id=principal.key_id, key_name=principal.name, action="read", resource=a.id
    )
    # Read everything before the commit: a query after it opens a new SQLite transaction
    # (BEGIN IMMEDIATE: the write lock) that stays open until the session dependency is torn
    # down, after the response; polls then stalled writers and other readers for up to the
    # 30 s busy timeout (seen as a 30 s GET in the load-test smoke).
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
        a = store.request_cancel(session, analysis_id=analysis_id)
        if a is None:
            raise ApiError(404, "not_found", f"no analysis {analysis_id}")
        if a.status in ("succeeded", "failed", "abstained"):
            raise ApiError(409, "already_finished", f"analysis is already {a.status}")
        store.audit(
            session,
            key_id=principal.key_id,
            key_name=principal.name,
            action="cancel",
            resource=a.id,
        )
    with services.sessions() as session:
        return to_public(session, get_analysis(session, analysis_id))
