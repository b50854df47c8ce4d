"""`/v1/slides` and `/v1/slide-uploads`: a whole scanned slide as the unit of work.

A LIS names a slide the gateway can read (`{"slide": {"store": "pathology", "path":
"2026/ACC-1.svs"}}`, a configured slide store) or uploads it first (`PUT /v1/slide-uploads`,
streamed to disk, size-limited by `MS_GATEWAY_MAX_SLIDE_BYTES`) and names the upload. The
analysis is then queued like any other: a worker scores the slide's regions, cuts the selected
ones into tiles (the case's images) and runs the pipeline on them (`services/gateway/slidejob`).
The analysis is read, cancelled, retried and reported through `/v1/analyses/{id}`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from marrowscope.slidecheck import ScanChecks, open_scan
from marrowscope.slides import SlideError
from services.gateway import intake, store
from services.gateway.blobs import expire_uploads
from services.gateway.config import GatewaySettings
from services.gateway.container import Services
from services.gateway.deps import (
    ServicesDep,
    SettingsDep,
    SubmitKey,
    replay,
    submitter,
)
from services.gateway.errors import ApiError, error_responses
from services.gateway.schemas import AnalysisAccepted, SlideAnalysisCreate, SlideUploaded
from services.gateway.slidejob import check_slide, scan_checks
from services.gateway.slidestore import (
    SlideStore,
    SlideStoreError,
    is_local,
    save_upload,
    source_path,
    upload_bytes,
    upload_dir,
    upload_paths,
    upload_suffix,
)
from services.gateway.uploads import parse_metadata

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["slides"])


def _store_error(exc: SlideStoreError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def _slide_error(exc: SlideError) -> ApiError:
    return ApiError(422, f"slide_{exc.code}", exc.message)


@router.put(
    "/slide-uploads",
    status_code=status.HTTP_201_CREATED,
    response_model=SlideUploaded,
    responses=error_responses(400, 401, 403, 413, 422, 429),
)
async def upload_slide(
    principal: SubmitKey,
    services: ServicesDep,
    settings: SettingsDep,
    request: Request,
    name: Annotated[
        str | None, Query(max_length=255, description="file name; its suffix names the format")
    ] = None,
) -> SlideUploaded:
    """Stream a slide file (the raw request body, any Content-Type) to the gateway's upload
    area. Larger than `MS_GATEWAY_MAX_SLIDE_BYTES`: 413 `slide_too_large`; beyond what the
    tenant's quota leaves (`MS_GATEWAY_SLIDE_UPLOAD_QUOTA_BYTES`, after its expired uploads
    are deleted): 413 `upload_quota_exceeded` (both from Content-Length before reading, else
    at the limit, the partial file removed). The slide is opened once to check it; a file
    that is not a readable slide gets 422 and is not kept. The same file uploaded twice is one
    upload (named by its SHA-256)."""
    try:
        suffix = upload_suffix(name)
        declared = request.headers.get("content-length")
        assert settings.slide_cache_dir is not None
        tenant_dir = upload_dir(settings.slide_cache_dir, principal.tenant)
        used = await asyncio.to_thread(_tenant_usage, services, settings, tenant_dir)
        path, size, sha = await save_upload(
            request.stream(),
            tenant_dir,
            max_bytes=settings.max_slide_bytes,
            quota_left=settings.slide_upload_quota_bytes - used,
            declared_length=int(declared) if declared and declared.isdigit() else None,
            suffix=suffix,
        )
    except SlideStoreError as exc:
        raise _store_error(exc) from None
    try:
        (w, h), levels, mpp = await asyncio.to_thread(_check_slide_any, path, scan_checks(settings))
    except SlideError as exc:
        path.unlink(missing_ok=True)
        raise _slide_error(exc) from None
    log.info("slide upload %s (%d bytes)", path.name, size)
    return SlideUploaded(
        upload=path.name,
        sha256=sha,
        size_bytes=size,
        width=w,
        height=h,
        levels=levels,
        um_per_px=mpp,
    )


def _check_slide_any(path: Path, checks: ScanChecks) -> tuple[tuple[int, int], int, float | None]:
    with open_scan(path, checks) as slide:
        return slide.info.dimensions, slide.level_count, slide.info.mpp


def _tenant_usage(services: Services, settings: GatewaySettings, tenant_dir: Path) -> int:
    """Bytes the tenant's uploads hold once its expired ones (not needed by an analysis
    that has not cut them yet) are deleted: a tenant is never refused for uploads that a
    sweep would remove anyway."""
    root = settings.slide_cache_dir
    assert root is not None
    with services.sessions() as session:
        in_use = upload_paths(root, store.uploads_in_use(session))
    expire_uploads(root, ttl_s=settings.slide_upload_ttl_s, in_use=in_use, tenant_dir=tenant_dir)
    return upload_bytes(tenant_dir)


@router.post(
    "/slides",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AnalysisAccepted,
    responses={
        200: {"model": AnalysisAccepted, "description": "Idempotent replay"},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
    },
)
def submit_slide(
    principal: SubmitKey,
    services: ServicesDep,
    settings: SettingsDep,
    response: Response,
    body: SlideAnalysisCreate,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> AnalysisAccepted:
    """Queue a whole-slide analysis (JSON body: `SlideAnalysisCreate`). The slide reference is
    checked now (store known, path confined to its root, file present and within the size
    limit; a local slide or an upload is opened to check its format and pixel size); the
    regions are selected and cut by the worker. Same Idempotency-Key + same body -> the same
    analysis (200); same key + different body -> 409."""
    # the same checks as a multipart submission's metadata (webhook policy included)
    meta = parse_metadata(body.model_dump_json(), settings, SlideAnalysisCreate)
    slides = SlideStore.from_settings(settings)
    source = meta.slide.source()
    try:
        if is_local(slides, source):
            path = source_path(slides, source, tenant=principal.tenant)
            check_slide(path, meta.options.um_per_px, scan_checks(settings))
    except SlideStoreError as exc:
        raise _store_error(exc) from None
    except SlideError as exc:
        raise _slide_error(exc) from None
    try:
        done = intake.submit(
            sessions=services.sessions,
            blobs=services.blobs,
            who=submitter(principal),
            metadata=meta.model_dump(mode="json"),
            images=[],
            idempotency_key=idempotency_key,
            action="submit_slide",
            detail=_describe(source),
            slide_source=source,
        )
    except store.Conflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    if done.replayed:
        return replay(services, principal, response, done.analysis_id)
    analysis_id = done.analysis_id
    log.info("accepted slide analysis %s (%s)", analysis_id, _describe(source))
    services.doorbell.ring()
    response.headers["Location"] = f"/v1/analyses/{analysis_id}"
    return AnalysisAccepted(id=analysis_id, status="queued", location=f"/v1/analyses/{analysis_id}")


def _describe(source: dict[str, str]) -> str:
    if "upload" in source:
        return f"upload {source['upload'][:16]}"
    return f"{source['store']}:{source['path']}"
