"""Creating an analysis from checked inputs: the one path behind `POST /v1/analyses`,
`POST /v1/slides` and the HL7 order listener (`services.hl7`).

An idempotency key makes a retried submission return the analysis it created the first
time (per tenant): the REST routes use the `Idempotency-Key` header, the HL7 listener the
placer order number. The blobs are written first (content-addressed, shared, never deleted
here), then the analysis, its images, its slide job, the idempotency row and the audit entry
in one transaction, so a failure leaves no half-created analysis. Two concurrent
submissions with the same key: the database's primary key lets one win and the other
replays it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from services.gateway import store
from services.gateway.config import GatewaySettings
from services.gateway.errors import CELL_IMAGES, IMAGES, ApiError
from services.gateway.uploads import CheckedImage, check_uploads, content_hash


@dataclass(frozen=True)
class Submitted:
    """The analysis a submission names, and whether it existed already (a replay)."""

    analysis_id: str
    status: str
    replayed: bool


@dataclass(frozen=True)
class Submitter:
    """Who submits: the tenant, and the API key (or the listener) the audit names."""

    tenant: str
    key_id: str | None
    key_name: str | None


def check_images(
    uploads: Sequence[Any], settings: GatewaySettings, *, cells: bool
) -> list[CheckedImage]:
    """The case's image files (objects with `file`, `size`, `filename`, as FastAPI's
    `UploadFile`) read, counted against the limit of the case's kind and decoded once each;
    ApiError (413 / 422, with the reason) otherwise, before anything is stored."""
    if not uploads:
        raise ApiError(422, "no_images", "at least one image is required")
    most = settings.max_cell_images if cells else settings.max_images
    if len(uploads) > most:
        limit = CELL_IMAGES if cells else IMAGES
        raise limit.error(
            f"{len(uploads)} images; at most {most} per analysis"
            + (" of single cells" if cells else "")
        )
    return check_uploads(uploads, settings, cells=cells)


def _existing(sessions: Any, who: Submitter, key: str | None, digest: str) -> Submitted | None:
    if not key:
        return None
    with sessions() as session:
        analysis_id = store.find_idempotent(
            session, tenant=who.tenant, key=key, content_hash=digest
        )
        if analysis_id is None:
            return None
        a = store.get_analysis(session, analysis_id=analysis_id, tenant=who.tenant)
        return Submitted(analysis_id, a.status if a is not None else "queued", True)


def submit(
    *,
    sessions: Any,
    blobs: Any,
    who: Submitter,
    metadata: dict[str, Any],
    images: Sequence[CheckedImage],
    idempotency_key: str | None,
    action: str,
    detail: str,
    slide_source: Mapping[str, str] | None = None,
) -> Submitted:
    """Create the analysis (or find the one `idempotency_key` created for the same content);
    `store.Conflict` when the key names other content. `action` / `detail`: the audit entry
    written with it."""
    digest = content_hash(metadata, list(images))
    if found := _existing(sessions, who, idempotency_key, digest):
        return found
    # Blobs are content-addressed and may already belong to other analyses (or to the
    # concurrent submission that wins an idempotency race), so this path never deletes
    # one: an unreferenced blob is removed only by `python -m services.gateway.blobs sweep`
    # after a grace period (`put` refreshes the mtime of a blob it finds).
    for c in images:
        blobs.put(c.data)
    try:
        with sessions.begin() as session:
            a = store.create_analysis(
                session,
                metadata=metadata,
                content_hash=digest,
                key_id=who.key_id,
                idempotency_key=idempotency_key,
                tenant=who.tenant,
                images=[
                    store.NewImage(c.sha256, len(c.data), c.width, c.height, c.format)
                    for c in images
                ],
            )
            if slide_source is not None:
                store.add_slide_job(session, analysis_id=a.id, source=dict(slide_source))
            store.audit(
                session,
                key_id=who.key_id,
                key_name=who.key_name,
                tenant=who.tenant,
                action=action,
                resource=a.id,
                detail=detail,
            )
            return Submitted(a.id, "queued", False)
    except IntegrityError:
        # a concurrent submission with the same key won the race
        if found := _existing(sessions, who, idempotency_key, digest):
            return found
        raise
