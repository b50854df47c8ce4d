"""Upload validation: every image is decoded once, fully, before anything is stored."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

from pydantic import ValidationError

from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.schemas import AnalysisCreate


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    format: str


def parse_metadata(raw: str | bytes | None, settings: GatewaySettings) -> AnalysisCreate:
    if raw is None or (isinstance(raw, str | bytes) and not raw.strip()):
        raise ApiError(422, "invalid_metadata", "the multipart part 'metadata' (JSON) is missing")
    if len(raw) > settings.max_metadata_bytes:
        raise ApiError(
            413,
            "metadata_too_large",
            f"metadata is larger than {settings.max_metadata_bytes} bytes",
        )
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_metadata", f"metadata is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_metadata", "metadata must be a JSON object")
    try:
        meta = AnalysisCreate.model_validate(doc)
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


def check_image(
    data: bytes, *, index: int, filename: str | None, settings: GatewaySettings
) -> CheckedImage:
    """Decode and validate one upload; ApiError 413/422 with the reason otherwise."""
    from PIL import Image

    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import ImageLimits, decode_image

    label = f"image {index}" + (f" ({filename})" if filename else "")
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"{label} is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
        )
    try:
        rgb = decode_image(
            data,
            limits=ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels),
        )
    except InvalidInput as exc:
        raise ApiError(422, "invalid_image", f"{label}: {exc}") from None
    with Image.open(io.BytesIO(data)) as im:  # header only: the format name for the record
        fmt = im.format or "unknown"
    return CheckedImage(
        data, hashlib.sha256(data).hexdigest(), int(rgb.shape[1]), int(rgb.shape[0]), fmt
    )


def content_hash(metadata: dict, images: list[CheckedImage]) -> str:
    """What an Idempotency-Key is bound to: canonical metadata JSON + ordered image hashes."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    for im in images:
        h.update(b"\n" + im.sha256.encode())
    return h.hexdigest()
