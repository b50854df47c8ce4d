"""The review app's pictures: a case's images, cell crops, the occlusion heatmap over a field
with its colour scale, and a slide's thumbnail with its regions.

Each answer is private to the logged-in reviewer (`Cache-Control: private, no-store`) and
scoped by the same `load_case` as the pages (the reviewer's tenant, a finished result).
"""

import functools
import io
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from PIL import Image as PILImage

from services.gateway import store
from services.gateway.container import Services
from services.gateway.db import Analysis, CaseReview
from services.gateway.errors import ApiError
from services.gateway.render import colour_scale_png, heatmap_png
from services.gateway.review import accounts, cases

PRIVATE = {"Cache-Control": "private, no-store"}
CROP_PX = 128

LoadCase = Callable[[accounts.ActiveSession, str], tuple[Analysis, dict[str, Any]]]


def _png(image: PILImage.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def add_routes(
    router: APIRouter,
    services: Services,
    current: Callable[..., accounts.ActiveSession],
    load_case: LoadCase,
) -> None:
    """Add the picture routes to the review app's `router` (its prefix is /review)."""
    Active = Annotated[accounts.ActiveSession, Depends(current)]

    @functools.lru_cache(maxsize=8)
    def decoded(sha256: str) -> PILImage.Image:
        """A field decoded once for all of its cells' crops (a gallery asks for hundreds)."""
        with PILImage.open(io.BytesIO(services.blobs.get(sha256))) as im:
            return im.convert("RGB")

    def image_sha(analysis_id: str, index: int) -> str:
        with services.sessions() as session:
            image = next(
                (im for im in store.images_of(session, analysis_id=analysis_id) if im.idx == index),
                None,
            )
        if image is None:
            raise ApiError(404, "not_found", f"no image {index} in analysis {analysis_id}")
        return image.sha256

    scale = colour_scale_png(width=256, height=12)

    @router.get("/heatmap-scale.png")
    def heatmap_scale() -> Response:
        """The heatmap's colour scale, low importance (left) to high."""
        return Response(scale, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @router.get("/cases/{analysis_id}/images/{index}")
    def field_image(active: Active, analysis_id: str, index: int) -> Response:
        a, _ = load_case(active, analysis_id)
        with services.sessions() as session:
            image = next(
                (im for im in store.images_of(session, analysis_id=a.id) if im.idx == index), None
            )
        if image is None:
            raise ApiError(404, "not_found", f"no image {index} in analysis {a.id}")
        data = services.blobs.get(image.sha256)
        media = {"png": "image/png", "jpeg": "image/jpeg"}.get(image.format.lower())
        if media is None:  # TIFF and the rest: browsers show PNG
            data, media = _png(decoded(image.sha256)), "image/png"
        return Response(data, media_type=media, headers=PRIVATE)

    @router.get("/cases/{analysis_id}/images/{index}/heatmap.png")
    def field_heatmap(active: Active, analysis_id: str, index: int) -> Response:
        """The explain service's occlusion map (npm1) blended over the field, at the field's
        size, so the page can swap it in place of the plain field under the same boxes."""
        a, result = load_case(active, analysis_id)
        entry = next((im for im in result["images"] if int(im["index"]) == index), None)
        if entry is None:
            raise ApiError(404, "not_found", f"no image {index} in analysis {a.id}")
        if not entry.get("heatmap_sha256"):
            raise ApiError(404, "no_heatmap", "this analysis was not run with options.explain")
        heat = np.load(io.BytesIO(services.blobs.get(entry["heatmap_sha256"])), allow_pickle=False)
        rgb = np.asarray(decoded(image_sha(a.id, index)))
        return Response(heatmap_png(rgb, heat), media_type="image/png", headers=PRIVATE)

    @router.get("/cases/{analysis_id}/slide.png")
    def slide_thumbnail(active: Active, analysis_id: str) -> Response:
        """A whole-slide case: the thumbnail with its selected regions outlined and numbered."""
        a, result = load_case(active, analysis_id)
        slide = result.get("slide")
        if not slide:
            raise ApiError(404, "no_slide", f"analysis {a.id} was not submitted as a slide")
        data = services.blobs.get(slide["thumbnail_sha256"])
        return Response(data, media_type="image/png", headers=PRIVATE)

    @router.get("/cases/{analysis_id}/cells/{cell_id}.png")
    def cell_crop(active: Active, analysis_id: str, cell_id: str) -> Response:
        a, result = load_case(active, analysis_id)
        with services.sessions() as session:
            review = session.get(CaseReview, a.id) or cases.review_of(session, a.id)
        cell = next((c for c in cases.case_cells(review, result) if c.id == cell_id), None)
        if cell is None:
            raise ApiError(404, "not_found", f"no cell {cell_id} in analysis {a.id}")
        im = decoded(image_sha(a.id, cell.image))
        x1, y1, x2, y2 = cell.box
        pad = 0.15 * max(x2 - x1, y2 - y1)
        box = (
            max(0, int(x1 - pad)),
            max(0, int(y1 - pad)),
            min(im.width, int(x2 + pad) + 1),
            min(im.height, int(y2 + pad) + 1),
        )
        crop = im.crop(box)
        crop.thumbnail((CROP_PX, CROP_PX))
        return Response(_png(crop), media_type="image/png", headers=PRIVATE)
