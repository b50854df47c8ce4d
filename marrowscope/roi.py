"""Automatic region-of-interest selection on a whole slide (the paper's stated limitation).

A hematologist reads the monolayer: cells side by side without overlap (not the thick area,
not the feathered edge), in focus, well stained, free of debris, with nucleated cells. This
module scores a grid of candidate regions at low magnification with image statistics that
measure exactly those things, then picks regions spread over the slide until the case has
enough nucleated cells (default 500, a manual differential) or the slide is exhausted.

Features per region (`RegionFeatures`), all computed at the scoring magnification on the
region white-balanced to the slide's own glass colour (`StainReference`: real
May-Grunwald-Giemsa glass is cream, synthetic glass grey; neither illumination nor tint may
read as cells):
- `coverage`: fraction of pixels that are not glass (optical density or saturation above
  the balanced glass);
- `overlap`: fraction of covered pixels darker than a single red-cell layer can be (cells on
  top of each other add optical density);
- `sharpness`: mean absolute Laplacian over covered pixels, relative to the covered pixels'
  contrast (a defocused field has its edges smoothed away);
- `debris`: fraction of near-black pixels (stain precipitate, dirt);
- `nuclei`: nucleated cells, counted as connected purple blobs of nuclear size (purple = bluer
  than the slide's own red cells, `NUCLEUS_HUE_FACTOR`);
- `stain`: mean saturation of covered pixels (a washed-out field has none).

The score multiplies one factor per requirement so that any single failure (thick, edge,
blurred, dirty, empty) rules a region out; `training/evaluate_roi.py` measures it on
synthetic slides with a known zone map (monolayer precision, AUROC) and runs it on the 43
real overview fields (docs/SLIDES.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from marrowscope.errors import InvalidInput
from marrowscope.slides import Slide, SlideError

log = logging.getLogger(__name__)

STOP_TARGET = "target_reached"
STOP_EXHAUSTED = "slide_exhausted"


@dataclass(frozen=True)
class RoiConfig:
    """region_um: side of a candidate region; scoring_um_per_px: the magnification regions are
    scored at (about 4x below a 0.25-0.5 um/px scan); cell_target: nucleated cells wanted;
    min_score: regions below are never selected; min_spacing: selected regions keep at least
    this many region sides between them while enough candidates remain (spread);
    max_scored_regions: a slide whose grid holds more regions is scored on that many, spread
    evenly over the grid (selection needs tens of regions, not every one of a 10k grid);
    max_scoring_s: scoring that runs longer fails with `scoring_timeout` (None: no limit)."""

    region_um: float = 256.0
    scoring_um_per_px: float = 2.0
    cell_target: int = 500
    min_score: float = 0.3
    min_spacing: float = 1.0
    nucleus_area_um2: tuple[float, float] = (20.0, 200.0)
    max_regions: int = 200
    max_scored_regions: int = 2048
    max_scoring_s: float | None = None


@dataclass(frozen=True)
class RegionFeatures:
    coverage: float
    overlap: float
    sharpness: float
    debris: float
    nuclei: int
    stain: float


@dataclass(frozen=True)
class Region:
    """A candidate region: x, y, size in level-0 pixels; row/col in the region grid."""

    row: int
    col: int
    x: int
    y: int
    size: int
    features: RegionFeatures
    score: float


@dataclass(frozen=True)
class Selection:
    """The regions chosen, the cells they hold (estimated at low magnification) and why the
    selection stopped (`target_reached` | `slide_exhausted`)."""

    regions: list[Region]
    cells: int
    stop_reason: str
    candidates: int
    target: int

    def summary(self) -> dict[str, int | str]:
        return {
            "regions": len(self.regions),
            "cells": self.cells,
            "stop_reason": self.stop_reason,
            "candidates": self.candidates,
            "target": self.target,
        }


# -- features ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StainReference:
    """A slide's own colour references, read from its overview (`stain_reference`).

    background: RGB of its glass (May-Grunwald-Giemsa glass is often cream or yellow, never
    the synthetic grey); red_cell_blue_green: median blue/green optical-density ratio of its
    covered pixels, which red cells dominate in every zone (the hue nuclei are told from).
    """

    background: tuple[float, float, float]
    red_cell_blue_green: float


# The synthetic generator's red cells (OD_RBC in training/data/synth_slide.py), the fallback
# for a slide with too few covered pixels to measure.
DEFAULT_REFERENCE = StainReference((236.0, 234.0, 238.0), 0.76)
# A nucleus is bluer than the slide's red cells by this factor in blue/green OD: synthetic
# nuclei 0.43 vs red cells 0.76 (0.57 x), real MGG overviews about 0.3 vs 0.6.
NUCLEUS_HUE_FACTOR = 0.8
COVER_OD = 0.25
COVER_SATURATION = 0.12
REFERENCE_PIXELS = 1 << 18
"""`stain_reference` reads at most this many pixels (evenly strided): medians and Otsu
thresholds do not need more, and its memory then stays flat whatever the overview size."""


def _hsv_parts(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = rgb.astype(np.float32)
    mx, mn = f.max(axis=-1), f.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)
    return mx, sat


def _optical_density(rgb: np.ndarray, background: tuple[float, float, float]) -> np.ndarray:
    """float32 [..., 3] optical density per channel against the slide's own glass colour."""
    glass = np.maximum(np.asarray(background, np.float32), 1.0)
    return -np.log(np.clip(rgb.astype(np.float32) / glass, 1e-3, 1.0))


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def stain_reference(rgb: np.ndarray) -> StainReference:
    """The colour references of a slide from a low-magnification image of it (uint8
    [h, w, 3]): glass = the per-channel median of the bright class of an Otsu split of
    luminance; red-cell hue = the median blue/green OD ratio of the pixels darker than glass
    by an Otsu split of total OD (at least `COVER_OD`). `DEFAULT_REFERENCE`'s hue when
    fewer than 1 % of the pixels are covered; a flat image is all glass when bright (its own
    colour), else `DEFAULT_REFERENCE`'s glass."""
    flat = rgb.reshape(-1, 3)
    f = flat[:: max(1, -(-len(flat) // REFERENCE_PIXELS))].astype(np.float32)
    hue = DEFAULT_REFERENCE.red_cell_blue_green
    if f.shape[0] == 0:
        return DEFAULT_REFERENCE
    lum = f.mean(axis=1)
    if float(np.ptp(lum)) < 1.0:
        r, g, b = f[0] if lum[0] > 128 else DEFAULT_REFERENCE.background
        return StainReference((float(r), float(g), float(b)), hue)
    r, g, b = np.median(f[lum > _otsu(lum)], axis=0)
    background = (float(r), float(g), float(b))
    od = _optical_density(f, background)
    total = od.sum(axis=1)
    covered = total > max(_otsu(total), COVER_OD)
    if covered.mean() >= 0.01:
        hue = float(np.median(od[covered, 2] / np.maximum(od[covered, 1], 1e-3)))
    return StainReference(background, hue)


def region_features(
    rgb: np.ndarray, *, reference: StainReference, um_per_px: float, config: RoiConfig
) -> RegionFeatures:
    """Statistics of one region image uint8[h, w, 3] at `um_per_px`, white-balanced to the
    slide's own glass (`reference`), so that the same constants hold for grey synthetic glass
    and the cream glass of real May-Grunwald-Giemsa smears."""
    from scipy import ndimage

    od = _optical_density(rgb, reference.background)
    balanced = 255.0 * np.exp(-od)  # the region as if its glass were white
    mx, sat = _hsv_parts(balanced)
    total_od = od.sum(axis=-1)
    covered = (total_od > COVER_OD) | (sat > COVER_SATURATION)
    coverage = float(covered.mean())
    n_cov = max(int(covered.sum()), 1)
    # Nuclear stain: bluer than the slide's red cells (hue), green absorbed most, not black.
    purple = od[..., 2] < NUCLEUS_HUE_FACTOR * reference.red_cell_blue_green * od[..., 1]
    # One red-cell layer reaches ~1.1 total OD; overlaps add up beyond it. Nuclei are dense
    # too but have the nuclear hue: a field rich in nucleated cells is not a thick one.
    overlap = float(((total_od > 1.45) & covered & ~purple).sum() / n_cov)
    grey = balanced.mean(axis=-1)
    lap = np.abs(ndimage.laplace(ndimage.gaussian_filter(grey, 0.5)))
    contrast = float(grey[covered].std()) if covered.any() else 0.0
    sharpness = float(lap[covered].mean() / (contrast + 1.0)) if covered.any() else 0.0
    debris = float((mx < 0.35 * 255.0).mean())
    nuc_mask = (od[..., 1] > 0.8) & purple & (mx >= 0.35 * 255.0)
    nuc_mask = ndimage.binary_opening(nuc_mask)
    labels, n = ndimage.label(nuc_mask)
    nuclei = 0
    if n:
        areas = np.bincount(labels.ravel())[1:] * um_per_px**2
        lo, hi = config.nucleus_area_um2
        nuclei = int(((areas >= lo) & (areas <= hi)).sum())
    stain = float(sat[covered].mean()) if covered.any() else 0.0
    return RegionFeatures(coverage, overlap, sharpness, debris, nuclei, stain)


def _bump(v: float, lo: float, hi: float, soft: float) -> float:
    """1 inside [lo, hi], falling off smoothly outside over `soft`."""
    if v < lo:
        return float(np.exp(-(((lo - v) / soft) ** 2)))
    if v > hi:
        return float(np.exp(-(((v - hi) / soft) ** 2)))
    return 1.0


def quality_score(f: RegionFeatures) -> float:
    """0..1: how well a region fits a hematologist's reading area (module docstring)."""
    monolayer = _bump(f.coverage, 0.35, 0.75, 0.12)  # not empty / feathered, not packed
    no_overlap = float(np.exp(-((f.overlap / 0.08) ** 2)))
    focus = float(1.0 / (1.0 + np.exp(-(f.sharpness - 0.8) / 0.1)))
    clean = float(np.exp(-((f.debris / 0.004) ** 2)))
    stained = float(1.0 / (1.0 + np.exp(-(f.stain - 0.08) / 0.02)))
    cells = 1.0 - float(np.exp(-f.nuclei / 2.0))
    return monolayer * no_overlap * focus * clean * stained * cells


# -- scoring a slide ---------------------------------------------------------------------------
def _scoring_level(slide: Slide, config: RoiConfig) -> tuple[int, float]:
    mpp = slide.info.mpp
    if mpp is None:
        raise SlideError(
            "no_pixel_size", "the slide records no pixel size; ROI selection needs um per pixel"
        )
    want = config.scoring_um_per_px / mpp
    level = slide.level_for_downsample(want)
    return level, slide.info.level_downsamples[level]


def grid_sample(rows: int, cols: int, budget: int) -> list[tuple[int, int]]:
    """(row, col) of at most `budget` cells of a rows x cols grid, row-major: every cell when
    they fit, else a coarser lattice of evenly spaced rows and columns (each at the centre of
    its stride) with the grid's aspect ratio, so the sample covers the whole slide."""
    n = rows * cols
    if n <= budget:
        return [(r, c) for r in range(rows) for c in range(cols)]
    n_rows = min(rows, max(1, round(rows * math.sqrt(budget / n))))
    n_cols = min(cols, max(1, budget // n_rows))
    pick_rows = [int((i + 0.5) * rows / n_rows) for i in range(n_rows)]
    pick_cols = [int((j + 0.5) * cols / n_cols) for j in range(n_cols)]
    return [(r, c) for r in pick_rows for c in pick_cols]


def score_slide(
    slide: Slide,
    config: RoiConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Region]:
    """Score the regions of the grid (at most `max_scored_regions`, `grid_sample`), reading
    one region at a time at the level closest to (not coarser than) `scoring_um_per_px`;
    memory is one region, whatever the slide size. `progress(done, total)` is called before
    each region and after the last (it may raise to stop the scoring); past `max_scoring_s`
    it raises `SlideError("scoring_timeout")`."""
    from PIL import Image

    config = config or RoiConfig()
    started = time.monotonic()
    level, ds = _scoring_level(slide, config)
    mpp = slide.info.mpp or 1.0
    size0 = max(1, round(config.region_um / mpp))  # region side, level-0 px
    side = max(8, round(size0 / ds))  # at the read level
    out_side = max(8, round(config.region_um / config.scoring_um_per_px))
    width, height = slide.info.dimensions
    cells = grid_sample(height // size0, width // size0, config.max_scored_regions)
    if progress is not None:
        progress(0, len(cells))
    # Glass colour and red-cell hue from the smallest level that fits (the overview).
    smallest = slide.level_count - 1
    sw, sh = slide.info.level_dimensions[smallest]
    fits = sw * sh <= slide.max_region_pixels
    reference = stain_reference(slide.read_level(smallest)) if fits else DEFAULT_REFERENCE
    um_px = config.region_um / out_side
    regions: list[Region] = []
    for k, (row, col) in enumerate(cells):
        if k and progress is not None:
            progress(k, len(cells))
        if config.max_scoring_s is not None and time.monotonic() - started > config.max_scoring_s:
            raise SlideError(
                "scoring_timeout",
                f"scored {k} of {len(cells)} regions in {config.max_scoring_s:g} s, the "
                "scoring budget; a smear scan of this size should not take longer",
            )
        x, y = col * size0, row * size0
        img = slide.read_region((x, y), level, (side, side))
        if side != out_side:
            img = np.asarray(
                Image.fromarray(img).resize((out_side, out_side), Image.Resampling.BILINEAR)
            )
        feats = region_features(img, reference=reference, um_per_px=um_px, config=config)
        regions.append(Region(row, col, x, y, size0, feats, quality_score(feats)))
    if progress is not None:
        progress(len(cells), len(cells))
    return regions


def score_image(
    rgb: np.ndarray, *, um_per_px: float, config: RoiConfig | None = None
) -> list[Region]:
    """Score the region grid of an in-memory low-magnification field (e.g. the 43 real
    overview fields) with the same features and score as `score_slide`: the field is resized
    to `scoring_um_per_px` first, as `score_slide` resizes each region; coordinates and sizes
    are pixels of `rgb`."""
    from PIL import Image

    config = config or RoiConfig()
    if um_per_px <= 0:
        raise InvalidInput(f"um_per_px must be positive, got {um_per_px}")
    factor = um_per_px / config.scoring_um_per_px
    h, w = rgb.shape[:2]
    small = rgb
    if abs(factor - 1.0) > 1e-6:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    side = max(8, round(config.region_um / config.scoring_um_per_px))  # at scoring scale
    side0 = max(1, round(config.region_um / um_per_px))  # in pixels of rgb
    reference = stain_reference(small)
    out: list[Region] = []
    for row in range(small.shape[0] // side):
        for col in range(small.shape[1] // side):
            img = small[row * side : (row + 1) * side, col * side : (col + 1) * side]
            feats = region_features(
                img, reference=reference, um_per_px=config.scoring_um_per_px, config=config
            )
            out.append(
                Region(row, col, col * side0, row * side0, side0, feats, quality_score(feats))
            )
    return out


def select_regions(regions: list[Region], config: RoiConfig | None = None) -> Selection:
    """Best regions first, spread over the slide: a region closer than `min_spacing` region
    sides (Chebyshev, in grid cells) to one already chosen waits for a second pass, taken only
    if the spread-out regions did not reach the cell target. Stops at `cell_target` nucleated
    cells (`target_reached`) or when no region above `min_score` is left (`slide_exhausted`)."""
    config = config or RoiConfig()
    good = sorted((r for r in regions if r.score >= config.min_score), key=lambda r: -r.score)
    chosen: list[Region] = []
    cells = 0
    deferred: list[Region] = []
    for pass_regions, spread in ((good, True), (deferred, False)):
        for r in pass_regions:
            if cells >= config.cell_target or len(chosen) >= config.max_regions:
                break
            if spread and any(
                max(abs(r.row - c.row), abs(r.col - c.col)) <= config.min_spacing for c in chosen
            ):
                deferred.append(r)
                continue
            chosen.append(r)
            cells += r.features.nuclei
    stop = STOP_TARGET if cells >= config.cell_target else STOP_EXHAUSTED
    if not chosen:
        raise SlideError(
            "not_a_smear",
            f"no region of {len(regions)} scored >= {config.min_score}: no readable monolayer "
            "(empty glass, not a smear, or out of focus)",
        )
    return Selection(chosen, cells, stop, len(regions), config.cell_target)


def features_dict(r: Region) -> dict[str, float]:
    return {**asdict(r.features), "score": r.score}
