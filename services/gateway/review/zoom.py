"""Deep zoom over a slide case: the DZI descriptor and its tiles, read from the slide itself.

`GET /review/cases/{id}/slide.dzi` and `GET /review/cases/{id}/slide_files/{level}/{col}_{row}.{fmt}`
(the paths OpenSeadragon derives from a DZI's URL). Each is scoped like every picture of the
app (`load_case`: the reviewer's session and tenant, a finished result), addressed by the
analysis id only, and read from the slide named in the result (`slide.source`, through the
gateway's slide stores: an expired upload or a moved slide answers 404 `slide_unavailable`,
and the page still has the thumbnail). Tiles come from `marrowscope.deepzoom.read_tile`:
bounded reads, 404 for a tile outside the pyramid, 400 for a malformed tile name.

Caching: tiles are private (`Cache-Control: private, max-age=...`, `Vary: Cookie`) with an
ETag; a revalidation is answered 304 after the session and tenant checks, without
reading the slide. An analysis's slide never changes (its source is pinned in the result).
"""

import hashlib
import io
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image as PILImage
from pydantic import BaseModel, Field

from marrowscope.deepzoom import (
    MAX_OVERLAP,
    MAX_TILE_SIZE,
    MIN_TILE_SIZE,
    DeepZoomLayout,
    read_tile,
)
from marrowscope.slides import Slide, SlideError
from services.gateway.container import Services
from services.gateway.db import Analysis
from services.gateway.errors import ApiError
from services.gateway.review import accounts
from services.gateway.slidestore import SlideStore, SlideStoreError, source_path

TILE_NAME = re.compile(r"^(\d{1,6})_(\d{1,6})\.([a-z]{3,4})$")
MEDIA = {"jpeg": "image/jpeg", "png": "image/png"}

OSD_STYLE_HASH = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="
"""The one stylesheet OpenSeadragon 6.1.1 adds to the page (`.openseadragon-canvas:focus`
on touch screens): allowed by its hash in the pages' CSP, no other inline style is.
tests/browser checks that the viewer runs with no CSP violation; recompute on an upgrade."""

LoadCase = Callable[[accounts.ActiveSession, str], tuple[Analysis, dict[str, Any]]]


class TileSettings(BaseModel):
    """How slide tiles are cut and sent (part of the review settings)."""

    tile_size: int = Field(254, ge=MIN_TILE_SIZE, le=MAX_TILE_SIZE)
    overlap: int = Field(1, ge=0, le=MAX_OVERLAP)
    format: Literal["jpeg", "png"] = "jpeg"
    quality: int = Field(85, ge=30, le=95)
    max_age_s: int = Field(3600, ge=0)


def encode(rgb: Any, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    image = PILImage.fromarray(rgb)
    if fmt == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def add_routes(
    router: APIRouter,
    services: Services,
    current: Callable[..., accounts.ActiveSession],
    load_case: LoadCase,
    tiles: TileSettings,
) -> None:
    """Add the deep-zoom routes to the review app's `router` (its prefix is /review)."""
    Active = Annotated[accounts.ActiveSession, Depends(current)]
    slides = SlideStore.from_settings(services.settings)

    def slide_case(
        active: accounts.ActiveSession, analysis_id: str
    ) -> tuple[Analysis, dict[str, Any]]:
        a, result = load_case(active, analysis_id)
        slide = result.get("slide")
        if not slide:
            raise ApiError(404, "no_slide", f"analysis {a.id} was not submitted as a slide")
        return a, slide

    def layout_of(slide: dict[str, Any]) -> DeepZoomLayout:
        return DeepZoomLayout(
            int(slide["width"]), int(slide["height"]), tiles.tile_size, tiles.overlap
        )

    @router.get("/cases/{analysis_id}/slide.dzi")
    def slide_dzi(active: Active, analysis_id: str) -> Response:
        """The slide's Deep Zoom descriptor (size, tile size, overlap, tile format)."""
        _, slide = slide_case(active, analysis_id)
        return Response(
            layout_of(slide).dzi(tiles.format),
            media_type="application/xml",
            headers={"Cache-Control": "private, no-store"},
        )

    @router.get("/cases/{analysis_id}/slide_files/{level}/{name}")
    def slide_tile(
        request: Request, active: Active, analysis_id: str, level: str, name: str
    ) -> Response:
        """One tile: `level` of the Deep Zoom pyramid, `name` `{col}_{row}.{format}`."""
        match = TILE_NAME.match(name)
        if not level.isdigit() or len(level) > 3 or match is None:
            raise ApiError(
                400, "bad_tile", "a tile is slide_files/{level}/{col}_{row}.{format}, in integers"
            )
        col, row, fmt = int(match[1]), int(match[2]), match[3]
        if fmt != tiles.format:
            raise ApiError(400, "bad_tile", f"tiles are served as {tiles.format}, not {fmt}")
        a, slide = slide_case(active, analysis_id)
        layout = layout_of(slide)
        try:
            layout.tile_box(int(level), col, row)
        except SlideError as exc:
            raise ApiError(404, "tile_missing", exc.message) from None
        stamp = f"{a.id}|{level}|{col}|{row}|{tiles.model_dump_json()}"
        etag = '"' + hashlib.sha256(stamp.encode()).hexdigest()[:32] + '"'
        headers = {
            "Cache-Control": f"private, max-age={tiles.max_age_s}",
            "Vary": "Cookie",
            "ETag": etag,
        }
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        try:
            path = source_path(slides, slide["source"], tenant=a.tenant)
            with Slide(path) as reader:
                rgb = read_tile(reader, layout, int(level), col, row)
        except SlideStoreError as exc:
            raise ApiError(
                404, "slide_unavailable", f"the slide cannot be read: {exc.message}"
            ) from None
        except SlideError as exc:
            code = "tile_missing" if exc.code == "region_too_large" else "slide_unavailable"
            raise ApiError(404, code, exc.message) from None
        data = encode(rgb, tiles.format, tiles.quality)
        return Response(data, media_type=MEDIA[tiles.format], headers=headers)
