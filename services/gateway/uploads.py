"""Upload validation: every image is decoded once, fully, before anything is stored.

Memory: the case's pixel budget (`MAX_CASE_PIXELS`) is checked on the image headers before
anything is decoded; images are then decoded one at a time, at most `DECODE_SLOTS` at once
in the process (concurrent submissions queue for a slot), and each decode is dropped once
validated: a 4.4 KB PNG declaring 6000x6000 had taken the gateway to 604 MB.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from services.gateway.config import GatewaySettings
from services.gateway.errors import (
    CASE_PIXELS,
    CELL_IMAGE_PIXELS,
    METADATA_BYTES,
    PIXELS,
    UPLOAD_BYTES,
    ApiError,
)
from services.gateway.schemas import AnalysisCreate

M = TypeVar("M", bound=AnalysisCreate)


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    format: str


def parse_metadata(
    raw: str | bytes | None, settings: GatewaySettings, model: type[M] = AnalysisCreate
) -> M:
    if raw is None or (isinstance(raw, str | bytes) and not raw.strip()):
        raise ApiError(422, "invalid_metadata", "the multipart part 'metadata' (JSON) is missing")
    if len(raw) > settings.max_metadata_bytes:
        raise METADATA_BYTES.error(f"metadata is larger than {settings.max_metadata_bytes} bytes")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_metadata", f"metadata is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_metadata", "metadata must be a JSON object")
    try:
        meta = model.model_validate(doc)
    except ValidationError as exc:
        parts = [
            "{}: {}".format(".".join(str(p) for p in e["loc"]) or "metadata", e["msg"])
            for e in exc.errors()
        ]
        raise ApiError(422, "invalid_metadata", "; ".join(parts)) from None
    if meta.webhook_url is not None and settings.webhook_secret is None:
        raise ApiError(
            422,
            "webhooks_disabled",
            "webhook_url given but this gateway has no webhook secret configured",
        )
    if meta.webhook_url is not None:
        from services.gateway.webhooks import WebhookPolicy, WebhookRefused

        try:
            WebhookPolicy.from_settings(settings).check_url(str(meta.webhook_url))
        except WebhookRefused as exc:
            raise ApiError(422, "webhook_url_refused", str(exc)) from None
    return meta


@functools.cache
def _decode_slots(n: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(n)


def header_pixels(data: bytes) -> int:
    """Width x height from the image header (nothing decoded); 0 when unreadable, which
    the full decode then reports with its reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # any header problem is check_image's to explain
        return 0


def check_uploads(
    uploads: Sequence, settings: GatewaySettings, *, cells: bool = False
) -> list[CheckedImage]:
    """Read and validate the uploaded files (FastAPI `UploadFile`s) of one case: per-file
    size, the case's pixel budget from the headers, then a full decode of each in turn.
    `cells` (a single-cell case): each image also at most `max_cell_image_pixels`."""
    from services.gateway.guard import malloc_trim

    blobs: list[tuple[bytes, str | None]] = []
    case_pixels = 0
    for k, upload in enumerate(uploads):
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise UPLOAD_BYTES.error(
                f"image {k} is {upload.size} bytes; the limit is {settings.max_upload_bytes}"
            )
        data = upload.file.read(settings.max_upload_bytes + 1)
        pixels = header_pixels(data)
        if pixels > settings.max_pixels:  # from the header: nothing decoded yet
            label = f"image {k}" + (f" ({upload.filename})" if upload.filename else "")
            raise PIXELS.error(
                f"{label}: image declares {pixels} pixels; the limit is {settings.max_pixels}"
            )
        if cells:
            check_cell_size(pixels, index=k, filename=upload.filename, settings=settings)
        case_pixels += pixels
        if case_pixels > settings.max_case_pixels:
            raise CASE_PIXELS.error(
                f"images 0..{k} declare {case_pixels} pixels together; the limit per case is "
                f"{settings.max_case_pixels}"
            )
        blobs.append((data, upload.filename))
    checked = [
        check_image(data, index=k, filename=name, settings=settings)
        for k, (data, name) in enumerate(blobs)
    ]
    if cells:  # the decoded size, in case a header understated it
        for k, (c, (_, name)) in enumerate(zip(checked, blobs, strict=True)):
            check_cell_size(c.width * c.height, index=k, filename=name, settings=settings)
    if case_pixels >= 4_000_000:  # the decodes were freed; hand their pages back
        malloc_trim()
    return checked


def check_cell_size(
    pixels: int, *, index: int, filename: str | None, settings: GatewaySettings
) -> None:
    """422 not_a_cell_image when an image of a single-cell case is larger than a cell crop
    can be (`max_cell_image_pixels`): most likely a field of view sent as a cell."""
    if pixels > settings.max_cell_image_pixels:
        label = f"image {index}" + (f" ({filename})" if filename else "")
        raise CELL_IMAGE_PIXELS.error(
            f"{label} has {pixels} pixels; an image of a single-cell case (input cells) holds "
            f"at most {settings.max_cell_image_pixels}: send fields of view with input fields"
        )


def check_image(
    data: bytes, *, index: int, filename: str | None, settings: GatewaySettings
) -> CheckedImage:
    """Decode and validate one upload; ApiError 413/422 with the reason otherwise."""
    from PIL import Image

    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import ImageLimits, decode_image

    label = f"image {index}" + (f" ({filename})" if filename else "")
    if len(data) > settings.max_upload_bytes:
        raise UPLOAD_BYTES.error(
            f"{label} is {len(data)} bytes; the limit is {settings.max_upload_bytes}"
        )
    try:
        with _decode_slots(settings.decode_slots):
            rgb = decode_image(
                data,
                limits=ImageLimits(
                    max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels
                ),
            )
            height, width = int(rgb.shape[0]), int(rgb.shape[1])
            del rgb  # only the size is kept: never hold several full-size decodes
    except InvalidInput as exc:
        raise ApiError(PIXELS.status, PIXELS.code, f"{label}: {exc}") from None
    with Image.open(io.BytesIO(data)) as im:  # header only: the format name for the record
        fmt = im.format or "unknown"
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), width, height, fmt)


def content_hash(metadata: dict, images: list[CheckedImage]) -> str:
    """What an Idempotency-Key is bound to: canonical metadata JSON + ordered image hashes."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    for im in images:
        h.update(b"\n" + im.sha256.encode())
    return h.hexdigest()
