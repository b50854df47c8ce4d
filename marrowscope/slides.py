"""Whole-slide images read through OpenSlide, tile by tile, with bounded memory.

Why OpenSlide (openslide-python + the openslide-bin wheel): one maintained C library reads
Aperio SVS, generic pyramidal tiled TIFF and (since 4.0) DICOM VL Whole Slide Microscopy,
with no format code of ours; the comparison with tiffslide and wsidicom is in
docs/SLIDES.md. OpenSlide reads local files only, so object-store slides are fetched to a
local file first (`services.gateway.slidestore`).

Memory rule: nothing here ever decodes a whole level. `read_region` refuses a request larger
than `max_region_pixels`, and callers walk a slide in regions (`roi.score_slide`), so peak
memory depends on the region size, never on the slide size.

Every failure becomes a `SlideError` with a stable `code`:
`not_found`, `unknown_format`, `corrupt` (a truncated file or an unreadable tile),
`level_missing`, `region_too_large`, `invalid_region`, `not_a_smear` and `scoring_timeout` (set by
ROI selection), `no_overview`, `compression_implausible` and `tiles_shared` (`slidecheck`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from marrowscope.errors import InvalidInput

if TYPE_CHECKING:
    import openslide

log = logging.getLogger(__name__)

DEFAULT_MAX_REGION_PIXELS = 4096 * 4096
"""One read_region call returns at most this many pixels (64 MiB as RGBA)."""


_SLIDE_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _looks_like_slide(path: Path) -> bool:
    """TIFF/BigTIFF magic, or DICOM's preamble marker: a damaged slide, not a foreign file
    (only the magic numbers are read; the formats themselves are OpenSlide's business)."""
    with path.open("rb") as f:
        head = f.read(132)
    return head[:4] in _SLIDE_MAGIC or head[128:132] == b"DICM"


class SlideError(InvalidInput):
    """A slide cannot be read as asked; `code` says why (module docstring lists them)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SlideInfo:
    """What a slide declares: level sizes (w, h) and downsamples, pixel size and vendor."""

    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    """Micrometres per level-0 pixel, when the file records it."""

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


class Slide:
    """An open whole-slide image. Use as a context manager; `close()` frees the handle.

    Coordinates: `read_region((x, y), level, (w, h))` takes x, y in level-0 pixels (the
    OpenSlide convention) and w, h in pixels of `level`; it returns uint8[h, w, 3] RGB with
    transparent (unscanned) areas composited onto white glass.
    """

    def __init__(self, path: str | Path, *, max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS):
        import openslide

        self.path = Path(path)
        self.max_region_pixels = max_region_pixels
        if not self.path.is_file():
            raise SlideError("not_found", f"no slide file {self.path.name!r}")
        self._osr: openslide.OpenSlide | None = None
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            if _looks_like_slide(self.path):
                raise SlideError(
                    "corrupt",
                    f"{self.path.name!r} starts like a TIFF/DICOM slide but cannot be read "
                    "(truncated or damaged file?)",
                ) from exc
            raise SlideError(
                "unknown_format",
                f"{self.path.name!r} is not a slide format OpenSlide reads "
                "(SVS, pyramidal tiled TIFF, DICOM WSI, ...)",
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError("corrupt", f"{self.path.name!r} cannot be opened: {exc}") from exc
        osr = self._osr
        props = osr.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            self.info = SlideInfo(
                vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown",
                level_dimensions=tuple((int(w), int(h)) for w, h in osr.level_dimensions),
                level_downsamples=tuple(float(d) for d in osr.level_downsamples),
                mpp=float(mpp) if mpp else None,
            )
        except openslide.OpenSlideError as exc:
            self.close()
            raise SlideError("corrupt", f"{self.path.name!r}: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None

    def _reader(self) -> openslide.OpenSlide:
        if self._osr is None:
            raise RuntimeError(f"slide {self.path.name!r} is closed")
        return self._osr

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.info.level_dimensions)

    def level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is largest but not above `downsample` (read less, then
        resize a little), as OpenSlide's get_best_level_for_downsample."""
        return int(self._reader().get_best_level_for_downsample(downsample))

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """uint8[h, w, 3] RGB of `size` (w, h) at `level`, top-left `location` in level-0 px."""
        if not 0 <= level < self.level_count:
            raise SlideError(
                "level_missing",
                f"level {level} requested; {self.path.name!r} has levels 0..{self.level_count - 1}",
            )
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise SlideError("invalid_region", f"region size must be positive, got {w}x{h}")
        if w * h > self.max_region_pixels:
            raise SlideError(
                "region_too_large",
                f"{w}x{h} px at level {level} exceeds {self.max_region_pixels} px per read; "
                "read the slide in smaller regions",
            )
        import openslide

        try:
            rgba = self._reader().read_region((int(location[0]), int(location[1])), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                "corrupt",
                f"{self.path.name!r}: cannot read level {level} at {tuple(location)}: {exc} "
                "(truncated or damaged file?)",
            ) from exc
        arr = np.asarray(rgba, dtype=np.uint8)
        # OpenSlide returns premultiplied RGBA; alpha 0 where nothing was scanned -> white glass.
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = arr[..., :3].astype(np.uint16) + (255 - alpha)
        out: np.ndarray = np.minimum(rgb, 255).astype(np.uint8)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level, for the small levels only (the overview used by ROI scoring):
        refused with `region_too_large` like any read above the limit."""
        if not 0 <= level < self.level_count:
            raise SlideError(
                "level_missing",
                f"level {level} requested; {self.path.name!r} has levels 0..{self.level_count - 1}",
            )
        w, h = self.info.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))


def open_slide(path: str | Path, *, max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS) -> Slide:
    """Open a local slide file and check it is readable end to end at its smallest level, so a
    truncated file is refused at once (writers put the small levels last) instead of halfway
    through an analysis."""
    slide = Slide(path, max_region_pixels=max_region_pixels)
    try:
        last = slide.level_count - 1
        w, h = slide.info.level_dimensions[last]
        if w * h <= max_region_pixels:
            slide.read_level(last)
        else:
            log.info("slide %s: smallest level %dx%d too large to check", slide.path.name, w, h)
    except BaseException:
        slide.close()
        raise
    return slide
