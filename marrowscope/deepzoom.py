"""Deep Zoom tiles of a whole slide, read through `marrowscope.slides.Slide` (bounded reads).

Deep Zoom (the format OpenSeadragon reads) describes an image as a pyramid of levels, each
half the size of the next, from 1x1 px (level 0) up to the full image (`max_level`); each
level is cut into `tile_size` squares, and each tile carries `overlap` extra pixels on every
side that has a neighbour. A Deep Zoom level of downsample d is read from the slide level
whose downsample is the largest not above d (OpenSlide's best level) and resized by the
rest, so when d is one of the slide's own downsamples the tile is that level's pixels.

Why not `openslide.deepzoom.DeepZoomGenerator`: it reads through the OpenSlide handle with no
size bound, so on a slide without a pyramid its small levels would decode the whole scan for
one tile. Here every read goes through `Slide.read_region`, which refuses more than
`max_region_pixels` (`region_too_large`), and white glass stands for unscanned areas as in
every other read of a slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from marrowscope.slides import Slide, SlideError

MIN_TILE_SIZE = 64
MAX_TILE_SIZE = 1024
MAX_OVERLAP = 8
MAX_LEVEL_GAP = 4.0
"""A tile may be read from a slide level at most this much finer than the tile (per side):
beyond it the read is refused instead of decoding a large region for a small tile."""


@dataclass(frozen=True)
class DeepZoomLayout:
    """The Deep Zoom pyramid of an image of `width` x `height` level-0 pixels."""

    width: int
    height: int
    tile_size: int = 254
    overlap: int = 1

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise SlideError("invalid_region", f"image size {self.width}x{self.height} is empty")
        if not MIN_TILE_SIZE <= self.tile_size <= MAX_TILE_SIZE:
            raise ValueError(f"tile_size must be {MIN_TILE_SIZE}..{MAX_TILE_SIZE}")
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"overlap must be 0..{MAX_OVERLAP}")

    @property
    def max_level(self) -> int:
        """The full-resolution level: ceil(log2(longest side))."""
        return math.ceil(math.log2(max(self.width, self.height)))

    def downsample(self, level: int) -> int:
        return 1 << (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        d = self.downsample(level)
        return math.ceil(self.width / d), math.ceil(self.height / d)

    def tile_count(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at `level`."""
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) of a tile in pixels of `level`, overlap included; SlideError
        `tile_missing` when the level or the tile is outside the pyramid."""
        if not 0 <= level <= self.max_level:
            raise SlideError("tile_missing", f"level {level} outside 0..{self.max_level}")
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise SlideError(
                "tile_missing", f"tile {col}_{row} outside level {level}'s {cols}x{rows} tiles"
            )
        w, h = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        x1 = col * ts - (ov if col > 0 else 0)
        y1 = row * ts - (ov if row > 0 else 0)
        return x1, y1, min(w, (col + 1) * ts + ov), min(h, (row + 1) * ts + ov)

    def dzi(self, fmt: str) -> str:
        """The DZI descriptor (XML) that OpenSeadragon opens."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{fmt}" Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


def read_tile(slide: Slide, layout: DeepZoomLayout, level: int, col: int, row: int) -> np.ndarray:
    """uint8[h, w, 3] RGB of one Deep Zoom tile (see the module docstring for the levels).

    Raises SlideError `tile_missing` for a tile outside the pyramid, `region_too_large` when
    the slide has no level within `MAX_LEVEL_GAP` of the tile's scale, `corrupt` for an
    unreadable slide region."""
    x1, y1, x2, y2 = layout.tile_box(level, col, row)
    d = layout.downsample(level)
    k = slide.level_for_downsample(d)
    dk = slide.info.level_downsamples[k]
    w, h = x2 - x1, y2 - y1
    # the same region at slide level k: level-0 origin, size in level-k pixels
    rw, rh = max(1, round(w * d / dk)), max(1, round(h * d / dk))
    if rw * rh > (MAX_LEVEL_GAP**2) * w * h and rw * rh > MAX_TILE_SIZE**2:
        raise SlideError(
            "region_too_large",
            f"level {level} (downsample {d}) has no slide level close enough "
            f"(nearest {dk:g}); the slide has no pyramid for it",
        )
    rgb = slide.read_region((x1 * d, y1 * d), k, (rw, rh))
    if (rw, rh) == (w, h):
        return rgb
    from PIL import Image

    # area averaging: a 2x or 3x reduction, where Lanczos costs ~10x more for no visible gain
    resized = Image.fromarray(rgb).resize((w, h), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.uint8)
