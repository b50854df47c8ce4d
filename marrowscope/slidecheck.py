"""What every real smear scan satisfies, checked before a worker spends minutes on a file.

A "slide bomb" declares a huge image in a tiny file: a 442 KB tiled TIFF that declares
60,000 x 60,000 px because all its TileOffsets point at one tile. OpenSlide reads it happily
(every tile decodes), and region scoring then works through 13,689 regions of the same pixels.
Three properties of a real scan refuse it at once, from the file's structure alone:

- `no_overview`: its smallest pyramid level fits one bounded read (`max_region_pixels`).
  Scanners and converters always write a pyramid down to an overview of a few Mpx; a file
  without one cannot be checked end to end (truncation) nor colour-referenced.
- `compression_implausible`: file bytes per declared level-0 pixel. A JPEG tile of blank
  glass still costs ~0.02 byte/px (DC + end-of-block codes per 8x8 block, plus its header),
  a real slide averages 0.05-0.5; deflate's ratio cannot exceed ~1030:1 (0.003 byte/px for
  RGB). `DEFAULT_MIN_BYTES_PER_PIXEL` (1e-3) lies far below all of them.
- `tiles_shared`: in a TIFF, one offset used by more than `max_shared_tiles` of a level's
  tiles (and by at least `MIN_SHARED_TILES`). Writers that de-duplicate blank tiles exist, so
  the bound is a fraction of the level, not "any sharing" (sparse tiles at offset 0 are
  ignored: OpenSlide shows them as glass).

These checks bound what one file can claim; the region budget of `roi.score_slide` bounds
what any file that passes them can cost.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from marrowscope.slides import DEFAULT_MAX_REGION_PIXELS, Slide, SlideError, SlideInfo, open_slide

log = logging.getLogger(__name__)

DEFAULT_MIN_BYTES_PER_PIXEL = 1e-3
DEFAULT_MAX_SHARED_TILES = 0.5
MIN_SHARED_TILES = 16
"""Fewer tiles than this sharing an offset is never refused (a tiny level, a blank corner)."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class ScanChecks:
    """The bounds `check_scan` applies (module docstring); `max_shared_tiles` 1.0 and
    `min_bytes_per_pixel` 0 switch those two checks off."""

    max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS
    min_bytes_per_pixel: float = DEFAULT_MIN_BYTES_PER_PIXEL
    max_shared_tiles: float = DEFAULT_MAX_SHARED_TILES


def open_scan(path: str | Path, checks: ScanChecks | None = None) -> Slide:
    """`open_slide` plus `check_scan`: what the gateway opens, at submission and in the
    worker, so a slide from any source meets the same bounds."""
    checks = checks or ScanChecks()
    slide = open_slide(path, max_region_pixels=checks.max_region_pixels)
    try:
        check_scan(slide.path, slide.info, checks)
    except BaseException:
        slide.close()
        raise
    return slide


def check_scan(path: Path, info: SlideInfo, checks: ScanChecks) -> None:
    """Raise `SlideError` (`no_overview`, `compression_implausible`, `tiles_shared`) when the
    file at `path`, declaring `info`, cannot be a real scan."""
    name = path.name
    w_min, h_min = info.level_dimensions[-1]
    if w_min * h_min > checks.max_region_pixels:
        raise SlideError(
            "no_overview",
            f"{name!r}: its smallest level is {w_min}x{h_min} px, above the "
            f"{checks.max_region_pixels} px one check may read; a scan has a pyramid down to "
            "an overview",
        )
    w0, h0 = info.dimensions
    per_px = path.stat().st_size / max(1, w0 * h0)
    if per_px < checks.min_bytes_per_pixel:
        raise SlideError(
            "compression_implausible",
            f"{name!r}: {path.stat().st_size} bytes for {w0}x{h0} px is {per_px:.2g} byte per "
            f"pixel, below the {checks.min_bytes_per_pixel:g} of any real scan",
        )
    if checks.max_shared_tiles < 1.0:
        _check_tiles(path, checks.max_shared_tiles)


def _check_tiles(path: Path, max_shared: float) -> None:
    for k, offsets in enumerate(_tile_offsets(path)):
        if len(offsets) < MIN_SHARED_TILES:
            continue
        _, shared = Counter(offsets).most_common(1)[0]
        if shared >= MIN_SHARED_TILES and shared > max_shared * len(offsets):
            raise SlideError(
                "tiles_shared",
                f"{path.name!r}: {shared} of the {len(offsets)} tiles of directory {k} point "
                "at the same bytes; a scan stores each tile once",
            )


def _tile_offsets(path: Path) -> list[list[int]]:
    """The non-zero tile (or strip) offsets of each TIFF directory; none for DICOM (one
    frame per tile, no offset table to share). An offset table tifffile cannot parse is
    `corrupt`: the check must not be skipped by a file built to confuse it."""
    with path.open("rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return []
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return [[int(o) for o in page.dataoffsets if o > 0] for page in tif.pages]
    except (tifffile.TiffFileError, ValueError, OSError, AttributeError) as exc:
        raise SlideError(
            "corrupt", f"{path.name!r}: its TIFF directories cannot be read: {exc}"
        ) from exc
