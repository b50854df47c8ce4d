"""Reports of finished analyses (JSON, FHIR), explanation images, the result schema and
the audit trail."""

from __future__ import annotations

import io
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from marrowscope.imaging import decode_image
from services.gateway import pdfsign, store
from services.gateway.auth import Principal
from services.gateway.db import AuditLog
from services.gateway.deps import AdminKey, ReadKey, ServicesDep, SessionDep, audit, get_analysis
from services.gateway.errors import ApiError, error_responses
from services.gateway.fhir import build_bundle
from services.gateway.pdf import build_pdf, figure_from_blobs
from services.gateway.reading import case_header
from services.gateway.render import heatmap_png, overlay_png
from services.gateway.result import AnalysisResult, ImageResult
from services.gateway.review.cases import sign_out_record
from services.gateway.review.outcomes import stored_review_block
from services.gateway.schemas import ts

router = APIRouter(tags=["reports"])
FHIR_JSON = "application/fhir+json"
PDF = "application/pdf"


def _finished_result(session, analysis_id: str, principal: Principal) -> tuple[object, dict]:
    """The analysis and its stored result JSON (as stored: the JSON report returns it)."""
    a = get_analysis(session, analysis_id, principal)
    result = store.result_of(session, analysis_id=analysis_id)
    if result is None:
        raise ApiError(
            409,
            "no_result",
            f"analysis is {a.status}"
            + (f": {a.reason}" if a.reason else "")
            + "; no report available",
        )
    return a, result


def _finished_report(
    session, analysis_id: str, principal: Principal
) -> tuple[object, AnalysisResult]:
    """The analysis and its result as the model (results of older schema versions too)."""
    a, result = _finished_result(session, analysis_id, principal)
    return a, AnalysisResult.model_validate(result)


@router.get(
    "/v1/analyses/{analysis_id}/report",
    responses={
        200: {
            "content": {"application/json": {}, FHIR_JSON: {}, PDF: {}},
            "description": "AnalysisResult JSON, a FHIR R4B Bundle or the PDF report",
        },
        **error_responses(401, 403, 404, 409, 429),
    },
)
def get_report(
    principal: ReadKey,
    session: SessionDep,
    request: Request,
    analysis_id: str,
    format: Annotated[Literal["json", "fhir", "pdf"], Query()] = "json",
) -> Response:
    """The result as JSON (`AnalysisResult`, with the hematologist's `review` as it stands
    now), as a FHIR R4B DiagnosticReport Bundle (the PDF
    embedded as `presentedForm`) or as the PDF report (PDF/A-2b, `services.gateway.pdf`)."""
    a, result = _finished_result(session, analysis_id, principal)
    audit(session, principal, "report", resource=a.id, detail=format)
    session.commit()
    if format == "json":  # the stored result, with the review as it stands now (1.7)
        return JSONResponse({**result, "review": stored_review_block(session, a.id, result)})
    report = AnalysisResult.model_validate(result)
    services = request.app.state.services
    signed = sign_out_record(session, a.id)
    pdf = pdfsign.finish(
        build_pdf(
            case=case_header(a),
            result=report,
            figure=figure_from_blobs(services.blobs, report),
            sign_out=signed,
        ),
        signed,
        services.pdf_signer,
    )
    if format == "pdf":
        name = f"marrowscope-{a.id}.pdf"
        return Response(
            pdf, media_type=PDF, headers={"Content-Disposition": f'inline; filename="{name}"'}
        )
    bundle = build_bundle(
        analysis={"id": a.id, "accession_id": a.accession, "finished_at": ts(a.finished_at)},
        result=report,
        # the configured public URL, never the request's Host header (client-controlled)
        base_url=services.settings.public_base_url,
        presented_form=pdf,
        sign_out=signed,
    )
    return JSONResponse(bundle, media_type=FHIR_JSON)


def _image(
    services, session, analysis_id: str, k: int, principal: Principal
) -> tuple[np.ndarray, ImageResult]:
    _, report = _finished_report(session, analysis_id, principal)
    images = {im.index: im for im in report.images}
    if k not in images:
        raise ApiError(404, "not_found", f"analysis has no image {k}")
    entry = images[k]
    return decode_image(services.blobs.get(entry.sha256)), entry


PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


@router.get(
    "/v1/analyses/{analysis_id}/images/{k}/heatmap.png",
    response_class=Response,
    responses={**PNG, **error_responses(401, 403, 404, 409, 429)},
)
def heatmap(
    principal: ReadKey, services: ServicesDep, session: SessionDep, analysis_id: str, k: int
) -> Response:
    """Occlusion heatmap (npm1 model) blended over image k; needs `options.explain`."""
    rgb, entry = _image(services, session, analysis_id, k, principal)
    if not entry.heatmap_sha256:
        raise ApiError(404, "no_heatmap", "this analysis was not run with options.explain")
    hm = np.load(io.BytesIO(services.blobs.get(entry.heatmap_sha256)), allow_pickle=False)
    audit(session, principal, "heatmap", resource=analysis_id, detail=str(k))
    session.commit()
    return Response(heatmap_png(rgb, hm), media_type="image/png")


@router.get(
    "/v1/analyses/{analysis_id}/images/{k}/overlay.png",
    response_class=Response,
    responses={**PNG, **error_responses(401, 403, 404, 409, 429)},
)
def overlay(
    principal: ReadKey, services: ServicesDep, session: SessionDep, analysis_id: str, k: int
) -> Response:
    """Cell boxes coloured by type on image k; with explanations, line width and opacity
    grow with each cell's importance."""
    rgb, entry = _image(services, session, analysis_id, k, principal)
    audit(session, principal, "overlay", resource=analysis_id, detail=str(k))
    session.commit()
    return Response(overlay_png(rgb, entry.cells), media_type="image/png")


@router.get(
    "/v1/analyses/{analysis_id}/slide.png",
    response_class=Response,
    responses={**PNG, **error_responses(401, 403, 404, 409, 429)},
)
def slide_thumbnail(
    principal: ReadKey, services: ServicesDep, session: SessionDep, analysis_id: str
) -> Response:
    """A whole-slide analysis: the slide's thumbnail with the selected regions outlined and
    numbered (region k of `result.slide.regions` is labelled k + 1)."""
    _, report = _finished_report(session, analysis_id, principal)
    if report.slide is None:
        raise ApiError(404, "no_slide", "this analysis was not submitted as a whole slide")
    audit(session, principal, "slide_thumbnail", resource=analysis_id)
    session.commit()
    return Response(services.blobs.get(report.slide.thumbnail_sha256), media_type="image/png")


@router.get("/v1/schemas/result")
def result_schema() -> dict:
    """JSON Schema of the versioned analysis result (`schema_version`)."""
    return AnalysisResult.model_json_schema()


@router.get("/v1/audit", responses=error_responses(401, 403, 429))
def audit_log(
    _admin: AdminKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    tenant: Annotated[str | None, Query(max_length=64, description="only this tenant")] = None,
) -> list[dict]:
    """Who submitted or read what, and when (newest first), with the caller's tenant of each
    entry. Admin scope (admin keys see every tenant)."""
    q = select(AuditLog)
    if tenant is not None:
        q = q.where(AuditLog.tenant == tenant)
    rows = session.scalars(q.order_by(AuditLog.id.desc()).limit(limit))
    out = [
        {
            "at": ts(r.at),
            "key_id": r.api_key_id,
            "key_name": r.key_name,
            "tenant": r.tenant,
            "action": r.action,
            "resource": r.resource,
            "detail": r.detail,
        }
        for r in rows
    ]
    session.commit()  # end the transaction now, not at dependency teardown (SQLite write lock)
    return out
