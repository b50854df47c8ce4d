"""A whole slide becomes a case: score regions at low magnification, pick them, cut the tiles.

The worker's slide lane runs this before the pipeline for an analysis submitted through
`POST /v1/slides` (`metadata.slide`): the slide is opened from its store (or the gateway's
upload area) and checked like at submission (`marrowscope.slidecheck`), the regions of the
grid are scored (`marrowscope.roi.score_slide`, one region in memory at a time, at most
`max_scored_regions` within `max_scoring_s`, with a progress call between regions that
records `regions_done/regions_total` and stops the scoring when the analysis is cancelled),
`select_regions` picks regions spread over the slide until the case's nucleated-cell target
(default 500, as in a manual differential) or the slide is exhausted, and each selected region
is read at full resolution, PNG-encoded and stored as a content-addressed blob. The tiles then
become the analysis's images, in selection order, and the unchanged pipeline analyses them.

Bounded: one region is decoded at a time, each tile's pixels are dropped once encoded, and at
most `max_regions` tiles are cut; a checkpoint between tiles records progress
(`regions_done/regions_total`) and stops the work when the analysis is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from marrowscope.roi import Region, RoiConfig, Selection, score_slide, select_regions
from marrowscope.slidecheck import ScanChecks, open_scan
from marrowscope.slides import Slide, SlideError
from services.gateway.config import GatewaySettings

log = logging.getLogger(__name__)

T = TypeVar("T")

THUMBNAIL_PX = 1024
"""Longest side of the slide thumbnail drawn with the selected regions."""


@dataclass(frozen=True)
class Tile:
    """One selected region cut at level 0, PNG-encoded."""

    index: int
    sha256: str
    size_bytes: int
    width: int
    height: int
    region: dict


@dataclass
class Expansion:
    """What a slide became: its tiles, the selection report and the thumbnail PNG."""

    tiles: list[Tile]
    selection: dict
    thumbnail: bytes
    um_per_px: float | None
    slide: dict = field(default_factory=dict)


def scan_checks(settings: GatewaySettings) -> ScanChecks:
    """The bounds every slide meets, at submission and in the worker (`slidecheck`)."""
    return ScanChecks(
        min_bytes_per_pixel=settings.slide_min_bytes_per_pixel,
        max_shared_tiles=settings.slide_max_shared_tiles,
    )


def check_slide(
    path: Path, um_per_px: float | None, checks: ScanChecks
) -> tuple[tuple[int, int], int, float | None]:
    """Open a submitted slide once (format, truncation, levels, `slidecheck`'s bounds) and
    require a pixel size (the request's or the file's); (dimensions, levels, um/px), else
    SlideError with the reason."""
    with open_scan(path, checks) as slide:
        mpp = um_per_px or slide.info.mpp
        if mpp is None:
            raise SlideError(
                "no_pixel_size",
                "the slide records no pixel size; give options.um_per_px (region selection and "
                "morphometrics need micrometres per pixel)",
            )
        return slide.info.dimensions, slide.level_count, mpp


def roi_config(settings: GatewaySettings, cell_target: int | None) -> RoiConfig:
    """Region selection as configured, with the request's cell target when it gives one."""
    return RoiConfig(
        region_um=settings.slide_region_um,
        cell_target=cell_target or settings.slide_cell_target,
        max_regions=settings.slide_max_regions,
        max_scored_regions=settings.slide_max_scored_regions,
        max_scoring_s=settings.slide_scoring_timeout_s,
    )


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def region_doc(index: int, r: Region, um_per_px: float | None) -> dict:
    """A selected region for the report: level-0 box, grid cell, score and the cells the
    low-magnification scorer estimated (the pipeline's count is added after the analysis)."""
    return {
        "index": index,
        "x": r.x,
        "y": r.y,
        "width": r.size,
        "height": r.size,
        "row": r.row,
        "col": r.col,
        "score": round(float(r.score), 4),
        "cells_estimated": int(r.features.nuclei),
        "size_um": round(r.size * um_per_px, 1) if um_per_px else None,
    }


def thumbnail_png(slide: Slide, regions: list[Region], *, max_px: int = THUMBNAIL_PX) -> bytes:
    """The slide's smallest level that fits `max_px` (resized down), with each selected region
    outlined and numbered in selection order (1-based, as the report's region index + 1)."""
    from PIL import Image, ImageDraw

    w0, h0 = slide.info.dimensions
    level = slide.level_count - 1
    for k, (w, h) in enumerate(slide.info.level_dimensions):
        if w * h <= slide.max_region_pixels and max(w, h) <= 4 * max_px:
            level = k
            break
    lw, lh = slide.info.level_dimensions[level]
    img = Image.fromarray(slide.read_region((0, 0), level, (lw, lh)))
    scale = min(1.0, max_px / max(lw, lh))
    if scale < 1.0:
        img = img.resize((max(1, round(lw * scale)), max(1, round(lh * scale))), Image.BILINEAR)
    sx, sy = img.width / w0, img.height / h0
    draw = ImageDraw.Draw(img)
    line = max(1, round(max(img.size) / 400))
    for k, r in enumerate(regions):
        box = (r.x * sx, r.y * sy, (r.x + r.size) * sx - 1, (r.y + r.size) * sy - 1)
        draw.rectangle(box, outline=(0, 160, 60), width=line)
        draw.text((box[0] + line + 1, box[1] + line), str(k + 1), fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Abandoned(Exception):
    """Raised in the scoring thread once its task was cancelled (shutdown, lease lost)."""


async def _reading(abandoned: threading.Event, fn: Callable[..., T], *args, **kw) -> T:
    """`asyncio.to_thread` for a call that reads the open slide: when the awaiting task is
    cancelled, `abandoned` is set and the call is waited for before the cancellation goes on,
    so that `expand_slide` never closes the slide under a read in progress (OpenSlide
    aborts the whole process on that)."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        abandoned.set()
        with contextlib.suppress(BaseException):
            await call
        raise


async def expand_slide(
    path: Path,
    *,
    config: RoiConfig,
    put_blob: Callable[[bytes], None],
    checkpoint: Callable[[int, int], Awaitable[None]],
    scoring: Callable[[int, int], None] | None = None,
    checks: ScanChecks | None = None,
    um_per_px: float | None = None,
) -> Expansion:
    """Score, select and cut `path` (see the module docstring). `put_blob(data)` stores a tile;
    `checkpoint(done, total)` is awaited before each tile and after the last (it raises to
    stop); `scoring(done, total)` is called from the scoring thread between regions (it
    raises to stop). `um_per_px` overrides the pixel size the slide records. Raises
    `SlideError` (`not_a_smear`, `no_pixel_size`, `corrupt`, `scoring_timeout`,
    `tiles_shared`, ...) for a slide that cannot become a case."""
    abandoned = threading.Event()

    def score_progress(done: int, total: int) -> None:
        if abandoned.is_set():
            raise _Abandoned  # the awaiting task is gone: stop before the next region
        if scoring is not None:
            scoring(done, total)

    slide = await asyncio.to_thread(open_scan, path, checks)
    try:
        if um_per_px is not None:
            slide.info = dataclasses.replace(slide.info, mpp=um_per_px)
        regions = await _reading(abandoned, score_slide, slide, config, progress=score_progress)
        selection: Selection = select_regions(regions, config)
        mpp = slide.info.mpp
        total = len(selection.regions)
        tiles: list[Tile] = []
        for k, r in enumerate(selection.regions):
            await checkpoint(k, total)

            def cut(r: Region = r) -> tuple[bytes, int, int]:
                rgb = slide.read_region((r.x, r.y), 0, (r.size, r.size))
                return encode_png(rgb), rgb.shape[1], rgb.shape[0]

            data, w, h = await _reading(abandoned, cut)
            await asyncio.to_thread(put_blob, data)
            tiles.append(
                Tile(k, hashlib.sha256(data).hexdigest(), len(data), w, h, region_doc(k, r, mpp))
            )
        await checkpoint(total, total)
        thumb = await _reading(abandoned, thumbnail_png, slide, selection.regions)
        w0, h0 = slide.info.dimensions
        return Expansion(
            tiles=tiles,
            selection=selection.summary(),
            thumbnail=thumb,
            um_per_px=mpp,
            slide={
                "width": w0,
                "height": h0,
                "levels": slide.level_count,
                "vendor": slide.info.vendor,
            },
        )
    finally:
        slide.close()
