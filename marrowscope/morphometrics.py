"""Nucleus/cytoplasm split and per-cell morphometric features (classical image processing).

The paper (Eckardt et al. 2022) splits each detected cell into nucleus and cytoplasm and
derives area, perimeter, eccentricity, nucleus-to-cytoplasm ratio and colour range. This
module does the same without learning, so that it runs inside the segmentation service per
detected box and needs no model of its own.

Method, for a Romanowsky (MGG / Wright / Giemsa) stained crop with some background around
the cell:

- **Cell mask** (when not given): *darkness* = background luminance - pixel luminance, where
  the background is the median of the crop's border pixels. Three-class multi-Otsu on the
  smoothed darkness separates background, cytoplasm and nucleus; the cell is everything
  above the lower threshold, closed, hole-filled and opened (radius 4 px cuts the thin
  bridges to touching red cells), keeping the component that weighs most under a Gaussian
  centred on the crop. Pale red cells fall into the background class: they are lighter
  than white-cell cytoplasm and their centres are lighter still (hole-filling of a ring
  is undone by the opening only when the ring is thin, which red-cell rims are).
- **Nucleus mask**: *purple index* = blue chromaticity B/(R+G+B) - 0.6 * mean intensity.
  Chromatin is both bluer and darker than cytoplasm (orange/pink granules are red-shifted),
  which a hematoxylin deconvolution separates less well on these stains (measured on the
  wbc-seg set: median Dice 0.86 for `rgb2hed` vs 0.95 for this index). Otsu on the index
  inside the cell, small objects removed, small holes filled.

Definitions (all features are finite floats; see `FEATURE_NAMES` for the order):

- areas are pixel counts, times `um_per_px**2` when given (um^2), else px^2; perimeters
  are `skimage.measure.perimeter` (4-connected boundary length), times `um_per_px`.
  All pixels of a mask form one region, so a lobulated nucleus has one area, one
  perimeter (sum over lobes), one eccentricity and a solidity against the convex hull of
  all its lobes (low solidity = lobulated / segmented).
- `nc_ratio` = nucleus area / cytoplasm area, cytoplasm = cell minus nucleus. It is
  unbounded when the cytoplasm vanishes, so the cytoplasm area is floored at one pixel and
  the ratio clipped to `NC_RATIO_MAX`. `nucleus_fraction` = nucleus area / cell area is
  the bounded [0, 1] alternative (nc = f / (1 - f)).
- colour statistics are per-channel means and standard deviations of R, G, B scaled to
  [0, 1] over the nucleus and over the cytoplasm; `cell_colour_range` is the 95th minus
  the 5th percentile of luminance in [0, 1] inside the cell (the paper's "colour range").
- `segmentation_ok` is 1.0 when a cell and a non-empty nucleus were found, else 0.0 and
  every other feature is 0.0.

Learned split: `measure_cell` and `measure_cells` take an optional `splitter` (any object
with the `Splitter` protocol, e.g. `marrowscope.models.nucseg.LearnedSplitter`) that returns
the cell and nucleus masks of each crop; the features are then computed from its masks
exactly as from the classical ones. Without a splitter the classical split runs.

Error policy: `InvalidInput` for input that is not an image crop at all (wrong rank,
channel count or dtype, a mask of another shape, a non-positive or non-finite
`um_per_px`, boxes not shaped [N, 4] or not finite). An empty (zero-sized), tiny (< 8 px
a side) or blank crop is a legal input that yields the default vector with
`segmentation_ok = 0`, because detectors do emit such boxes and one bad box must not fail
a whole image.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from marrowscope.errors import InvalidInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NC_RATIO_MAX = 50.0
MIN_SIDE_PX = 8
# Foreground must be this much darker than the background (luminance in [0, 1]);
# below it the crop is treated as blank. Chosen well under the faintest cytoplasm in the
# wbc-seg set (about 0.06) and over flat-field noise.
MIN_CONTRAST = 0.03
PURPLE_DARKNESS_WEIGHT = 0.6

_CHANNELS = ("r", "g", "b")
FEATURE_NAMES: tuple[str, ...] = (
    "cell_area",
    "nucleus_area",
    "cytoplasm_area",
    "cell_perimeter",
    "nucleus_perimeter",
    "cell_eccentricity",
    "nucleus_eccentricity",
    "cell_solidity",
    "nucleus_solidity",
    "nc_ratio",
    "nucleus_fraction",
    *(f"nucleus_mean_{c}" for c in _CHANNELS),
    *(f"nucleus_std_{c}" for c in _CHANNELS),
    *(f"cytoplasm_mean_{c}" for c in _CHANNELS),
    *(f"cytoplasm_std_{c}" for c in _CHANNELS),
    "cell_colour_range",
    "segmentation_ok",
)


@dataclass(frozen=True)
class CellMeasurement:
    """Features of one cell and the masks they were computed from.

    `features` maps every name of `FEATURE_NAMES` to a finite float. `nucleus_mask` and
    `cell_mask` are bool [H, W] in the crop's pixel grid (nucleus is a subset of cell).
    """

    features: dict[str, float]
    nucleus_mask: np.ndarray
    cell_mask: np.ndarray
    names: tuple[str, ...] = field(default=FEATURE_NAMES, repr=False)

    def as_vector(self) -> np.ndarray:
        """float32 [F] in `FEATURE_NAMES` order."""
        return np.array([self.features[n] for n in self.names], dtype=np.float32)


class Splitter(Protocol):
    """Anything that splits cell crops into cell and nucleus masks (the learned split).

    `split(crops, centres)`: crops uint8 [h_i, w_i, 3], centres (y, x) of the wanted cell per
    crop (None = crop centre). Returns one (cell bool[h_i, w_i], nucleus bool[h_i, w_i]) per
    crop, nucleus inside cell; empty masks when no cell was found. `name` (e.g. "learned")
    and `version` say which split produced the features.
    """

    name: str
    version: str

    def split(
        self,
        crops: Sequence[np.ndarray],
        centres: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]: ...


def _default_features() -> dict[str, float]:
    return dict.fromkeys(FEATURE_NAMES, 0.0)


def _check_scale(um_per_px: float | None) -> float:
    if um_per_px is None:
        return 1.0
    scale = float(um_per_px)
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidInput(f"um_per_px must be a positive finite number, got {um_per_px!r}")
    return scale


def _check_image(image: np.ndarray, what: str) -> None:
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"{what} must be shaped [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        raise InvalidInput(f"{what} must be uint8, got {image.dtype}")


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    smoothed: np.ndarray = ndi.gaussian_filter(x, sigma, mode="nearest")  # scipy: untyped
    return smoothed


def central_component(mask: np.ndarray, centre: tuple[float, float] | None) -> np.ndarray:
    """The connected component that weighs most under a Gaussian at `centre` (y, x).

    The crop centre when `centre` is None; the Gaussian's sigma is a quarter of the crop.
    """
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    h, w = mask.shape
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if centre is None else centre
    yy, xx = np.ogrid[:h, :w]
    sy, sx = max(h / 4, 1.0), max(w / 4, 1.0)
    weight = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    scores = ndi.sum(weight, labels, index=np.arange(1, n + 1))
    largest: np.ndarray = labels == (int(np.argmax(scores)) + 1)  # ndi.label: untyped
    return largest


def _luminance(rgb01: np.ndarray) -> np.ndarray:
    lum: np.ndarray = rgb01 @ np.array([0.299, 0.587, 0.114])  # numpy types `@` as Any
    return lum


def segment_cell(crop: np.ndarray, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Cell (foreground) mask of a crop that shows background around the cell.

    crop: uint8 [H, W, 3]. centre: (y, x) pixel where the wanted cell lies, default the crop
    centre. Returns bool [H, W]; all False when no cell stands out.
    """
    from scipy import ndimage as ndi

    preload()  # the first skimage import, in one thread (see preload)
    from skimage import filters, morphology

    rgb = crop.astype(np.float64) / 255.0
    lum = _luminance(rgb)
    border = np.concatenate([lum[0], lum[-1], lum[1:-1, 0], lum[1:-1, -1]])
    darkness = _smooth(np.median(border) - lum, 1.5)
    if darkness.max() < MIN_CONTRAST:
        return np.zeros(lum.shape, dtype=bool)
    try:
        low, _ = filters.threshold_multiotsu(darkness, classes=3)
    except ValueError:  # too few distinct values for three classes
        low = filters.threshold_otsu(darkness)
    low = max(low, MIN_CONTRAST)
    mask = darkness > low
    mask = morphology.closing(mask, morphology.disk(2))
    mask = ndi.binary_fill_holes(mask)
    opened = morphology.opening(mask, morphology.disk(4))
    # a small cell (< ~9 px across) would vanish under the opening: keep it unopened
    mask = opened if opened.any() else mask
    return central_component(mask, centre) if mask.any() else mask


def segment_nucleus(crop: np.ndarray, cell_mask: np.ndarray) -> np.ndarray:
    """Nucleus mask inside `cell_mask` (bool [H, W]) of a uint8 [H, W, 3] crop."""
    preload()  # the first skimage import, in one thread (see preload)
    from skimage import filters, morphology

    if cell_mask.sum() < 4:
        return np.zeros(cell_mask.shape, dtype=bool)
    rgb = crop.astype(np.float64) / 255.0
    purple = rgb[..., 2] / (rgb.sum(axis=-1) + 1e-3) - PURPLE_DARKNESS_WEIGHT * rgb.mean(axis=-1)
    purple = _smooth(purple, 1.5)
    inside = purple[cell_mask]
    if np.ptp(inside) < 1e-6:
        return np.zeros(cell_mask.shape, dtype=bool)
    nucleus = (purple > filters.threshold_otsu(inside)) & cell_mask
    min_size = max(4, int(0.01 * cell_mask.sum()))
    nucleus = morphology.remove_small_objects(nucleus, max_size=min_size)
    # skimage is unannotated: its result (and so the `&`) is Any
    filled: np.ndarray = morphology.remove_small_holes(nucleus, max_size=100) & cell_mask
    return filled


def _shape(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(area px, perimeter px, eccentricity, solidity) of all True pixels as one region."""
    preload()  # the first skimage import, in one thread (see preload)
    from skimage import measure, morphology

    area = float(mask.sum())
    if area == 0:
        return 0.0, 0.0, 0.0, 0.0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # pad by one so the boundary is measured as in the full crop; smaller grid for the hull
    mask = np.pad(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 1)
    perimeter = float(measure.perimeter(mask))
    yy, xx = np.nonzero(mask)
    cov = np.cov(np.stack([yy, xx]).astype(np.float64), bias=True) if area > 1 else np.zeros((2, 2))
    # + 1/12: variance of a unit pixel, as skimage's regionprops moments include it
    lam = np.sort(np.linalg.eigvalsh(cov + np.eye(2) / 12))[::-1]
    ecc = float(math.sqrt(max(0.0, 1.0 - lam[1] / lam[0]))) if lam[0] > 0 else 0.0
    hull = morphology.convex_hull_image(mask) if area >= 3 else mask
    solidity = area / max(float(hull.sum()), area)
    return area, perimeter, ecc, solidity


def _colour(rgb01: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not mask.any():
        return np.zeros(3), np.zeros(3)
    px = rgb01[mask]
    return px.mean(axis=0), px.std(axis=0)


def _features(
    crop: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, scale: float
) -> dict[str, float]:
    feats = _default_features()
    cyto = cell & ~nucleus
    c_area, c_per, c_ecc, c_sol = _shape(cell)
    n_area, n_per, n_ecc, n_sol = _shape(nucleus)
    cyto_area = float(cyto.sum())
    rgb = crop.astype(np.float64) / 255.0
    n_mean, n_std = _colour(rgb, nucleus)
    y_mean, y_std = _colour(rgb, cyto)
    lum = _luminance(rgb[cell])
    feats.update(
        cell_area=c_area * scale**2,
        nucleus_area=n_area * scale**2,
        cytoplasm_area=cyto_area * scale**2,
        cell_perimeter=c_per * scale,
        nucleus_perimeter=n_per * scale,
        cell_eccentricity=c_ecc,
        nucleus_eccentricity=n_ecc,
        cell_solidity=c_sol,
        nucleus_solidity=n_sol,
        nc_ratio=min(n_area / max(cyto_area, 1.0), NC_RATIO_MAX),
        nucleus_fraction=n_area / c_area,
        cell_colour_range=float(np.percentile(lum, 95) - np.percentile(lum, 5)),
        segmentation_ok=1.0,
    )
    for i, ch in enumerate(_CHANNELS):
        feats[f"nucleus_mean_{ch}"] = float(n_mean[i])
        feats[f"nucleus_std_{ch}"] = float(n_std[i])
        feats[f"cytoplasm_mean_{ch}"] = float(y_mean[i])
        feats[f"cytoplasm_std_{ch}"] = float(y_std[i])
    return feats


def measure_cell(
    crop: np.ndarray,
    cell_mask: np.ndarray | None = None,
    um_per_px: float | None = None,
    *,
    centre: tuple[float, float] | None = None,
    splitter: Splitter | None = None,
) -> CellMeasurement:
    """Split one cell into nucleus and cytoplasm and measure it.

    crop: uint8 [H, W, 3] RGB, one cell with some background around it when `cell_mask` is
    None (the background level is read from the crop's border). cell_mask: bool [H, W] or
    None to segment the cell here. um_per_px: pixel size; areas in um^2 and lengths in um
    when given, else px^2 / px. centre: (y, x) of the wanted cell in the crop when it is
    not the crop centre (neighbours also in the crop are dropped). splitter: a learned
    split (`Splitter`) that gives both masks; `cell_mask` must then be None. Raises
    `InvalidInput` for malformed input (see module doc); empty, tiny or blank crops give
    `segmentation_ok = 0` and zeros.
    """
    _check_image(crop, "crop")
    scale = _check_scale(um_per_px)
    if splitter is None:
        return _measure(crop, cell_mask, scale, centre)
    if cell_mask is not None:
        raise InvalidInput("give either cell_mask or splitter, not both")
    if min(crop.shape[:2]) < MIN_SIDE_PX:
        return _measure(crop, None, scale, centre)
    ((cell, nucleus),) = splitter.split([crop], [centre])
    return measure_masks(crop, cell, nucleus, scale)


def measure_masks(
    crop: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, scale: float = 1.0
) -> CellMeasurement:
    """Features of a crop from given cell and nucleus masks (bool [H, W], nucleus cut to
    the cell); `segmentation_ok = 0` and zeros when either is empty. `scale` is um per px
    (1.0: px)."""
    cell = np.asarray(cell, dtype=bool)
    nucleus = np.asarray(nucleus, dtype=bool) & cell
    if cell.shape != crop.shape[:2] or nucleus.shape != crop.shape[:2]:
        raise InvalidInput(f"mask shapes {cell.shape}, {nucleus.shape} != crop {crop.shape[:2]}")
    if not cell.any() or not nucleus.any():
        return CellMeasurement(_default_features(), nucleus, cell)
    return CellMeasurement(_features(crop, cell, nucleus, scale), nucleus, cell)


def _measure(
    crop: np.ndarray,
    cell_mask: np.ndarray | None,
    scale: float,
    centre: tuple[float, float] | None,
) -> CellMeasurement:
    h, w = crop.shape[:2]
    if cell_mask is not None:
        cell_mask = np.asarray(cell_mask)
        if cell_mask.shape != (h, w):
            raise InvalidInput(f"cell_mask shape {cell_mask.shape} != crop shape {(h, w)}")
        cell_mask = cell_mask.astype(bool)
    empty = np.zeros((h, w), dtype=bool)
    if min(h, w) < MIN_SIDE_PX:
        return CellMeasurement(
            _default_features(), empty, empty if cell_mask is None else cell_mask
        )
    cell = segment_cell(crop, centre) if cell_mask is None else cell_mask
    nucleus = segment_nucleus(crop, cell)
    if not cell.any() or not nucleus.any():
        log.debug("no cell or no nucleus found in a %dx%d crop", h, w)
        return CellMeasurement(_default_features(), nucleus, cell)
    return CellMeasurement(_features(crop, cell, nucleus, scale), nucleus, cell)


_IMPORTED = threading.Event()
_IMPORT_LOCK = threading.Lock()


def preload() -> None:
    """Import the scipy / scikit-image modules the measurements use, once, under a lock.

    scikit-image loads its submodules lazily on first attribute access; two threads doing
    that first access at once (a service running two model threads) can see a partially
    initialised `skimage.morphology` ("has no attribute 'closing'"). Every entry point
    calls this first, so the first import completes in one thread before any other uses it.
    """
    if _IMPORTED.is_set():
        return
    with _IMPORT_LOCK:
        if not _IMPORTED.is_set():
            import scipy.ndimage
            import skimage.filters
            import skimage.measure
            import skimage.morphology

            del scipy, skimage
            _IMPORTED.set()


def measure_cells(
    image: np.ndarray,
    boxes: np.ndarray,
    um_per_px: float | None = None,
    margin: float = 0.15,
    splitter: Splitter | None = None,
    *,
    batched: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Features of every detected cell of an image: float32 [N, F] in `FEATURE_NAMES` order.

    image: uint8 [H, W, 3] RGB. boxes: float [N, 4] x1, y1, x2, y2 in pixels (detector
    output; clipped to the image here). Each box is widened by `margin` times its size on
    every side so that the crop shows background, the cell is segmented in that crop and
    the component at the box centre is measured; only the crop is processed, so the cost
    is linear in the total box area, not in the image size. Degenerate boxes (empty after
    clipping) give a default row with `segmentation_ok = 0`. With a `splitter` all crops
    of the image go to it in one call (one batch through a learned model) and the features
    come from its masks. `batched=True` computes the features of all crops as tensors
    (`marrowscope.morphometrics_batch`, on `device`, default the splitter's device or the
    CPU): the same masks, the same features within that module's documented tolerance.
    """
    preload()
    _check_image(image, "image")
    scale = _check_scale(um_per_px)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        if boxes.size == 0:
            return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
        raise InvalidInput(f"boxes must be shaped [N, 4] (x1, y1, x2, y2), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise InvalidInput("boxes contain NaN or infinite coordinates")
    if margin < 0 or not math.isfinite(margin):
        raise InvalidInput(f"margin must be a non-negative finite number, got {margin!r}")
    out = np.zeros((len(boxes), len(FEATURE_NAMES)), dtype=np.float32)
    rows, crops, centres = [], [], []
    for i, box in enumerate(boxes):
        window = box_window(image.shape[:2], box, margin)
        if window is None:
            continue  # default row, segmentation_ok = 0
        (y0, y1, x0, x1), centre = window
        if splitter is None and not batched:
            out[i] = _measure(image[y0:y1, x0:x1], None, scale, centre).as_vector()
        else:
            rows.append(i)
            crops.append(image[y0:y1, x0:x1])
            centres.append(centre)
    if crops and batched:
        from marrowscope.morphometrics_batch import measure_crops

        out[rows] = measure_crops(crops, centres, scale, splitter=splitter, device=device)
    elif crops and splitter is not None:
        masks = splitter.split(crops, centres)
        if len(masks) != len(crops):
            raise RuntimeError(f"splitter returned {len(masks)} mask pairs for {len(crops)} crops")
        for i, crop, (cell, nucleus) in zip(rows, crops, masks, strict=True):
            out[i] = measure_masks(crop, cell, nucleus, scale).as_vector()
    return out


def box_window(
    image_hw: tuple[int, int], box: np.ndarray | tuple[float, ...], margin: float = 0.15
) -> tuple[tuple[int, int, int, int], tuple[float, float]] | None:
    """Crop window around a box: ((y0, y1, x0, x1), box centre (y, x) in crop pixels).

    box: x1, y1, x2, y2 pixels, widened by `margin` times its width/height on every side
    and clipped to the image. None when the window is smaller than `MIN_SIDE_PX`.
    """
    h, w = image_hw
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = margin * max(x2 - x1, 0.0), margin * max(y2 - y1, 0.0)
    cx0, cy0 = int(max(0, math.floor(x1 - mx))), int(max(0, math.floor(y1 - my)))
    cx1, cy1 = int(min(w, math.ceil(x2 + mx))), int(min(h, math.ceil(y2 + my)))
    if cx1 - cx0 < MIN_SIDE_PX or cy1 - cy0 < MIN_SIDE_PX:
        return None
    return (cy0, cy1, cx0, cx1), ((y1 + y2) / 2 - cy0, (x1 + x2) / 2 - cx0)
