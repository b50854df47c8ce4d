"""Batched morphometrics: the mask statistics of `marrowscope.morphometrics`, vectorised in
torch over all cells of an image on the model's device.

Why: the per-cell path (`measure_masks`) spends most of its time in per-crop Python and
scikit-image calls (moments, `perimeter`, `convex_hull_image`, percentiles), about as
long as the split itself; an image of 150 cells pays that 150 times on one core. Here
every statistic is one tensor operation over a padded batch of crops.

What runs where:

- masks: the learned split (a `Splitter`, e.g. `marrowscope.models.nucseg.LearnedSplitter`,
  whose net sees all crops of the image as one batch on its device) when one is given;
  otherwise the classical split per crop (`segment_cell`, `segment_nucleus`, on the CPU),
  kept as the fallback;
- statistics: each crop cut to its cell's bounding box and turned so that it is wider than
  tall (every feature is invariant to both), then chunks of at most `CHUNK_PIXELS` padded
  pixels (crops of similar shape together), on `device`.

Measured (bench/segmentation_cells.py, one CPU core, 150 cells of 45-250 px): the
statistics take ~0.2 s batched vs ~0.9 s per cell with scikit-image, but the split still
runs per crop (classical) or through a U-Net that costs as much on a CPU (learned), so the
service gains 1.10x (classical) and nothing measurable (learned) on a CPU; the GPU case,
where both run on the device, was not measured.

Agreement with `morphometrics.measure_masks` on the same masks (asserted in
tests/test_morphometrics_batch.py):

- areas, perimeters (scikit-image's 4-neighbourhood boundary weights), `nc_ratio`,
  `nucleus_fraction`, `segmentation_ok`: the same pixel counts, equal to float32 rounding;
- eccentricities, colour means and standard deviations, `cell_colour_range`: float32
  instead of float64, within `ATOL` = 1e-4;
- solidities: the convex hull is the intersection of the half-planes supporting the mask
  in `HULL_DIRECTIONS` directions, taken through the same points as
  `skimage.morphology.convex_hull_image` (pixel-edge midpoints, border pixels included)
  instead of qhull's exact polygon. That polygon circumscribes the exact one, so it may
  hold a few more pixels at its corners: within `SOLIDITY_ATOL` = 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from marrowscope.morphometrics import (
    _CHANNELS,
    FEATURE_NAMES,
    NC_RATIO_MAX,
    Splitter,
    segment_cell,
    segment_nucleus,
)

HULL_DIRECTIONS = 128
CHUNK_PIXELS = 1 << 22
"""Padded pixels (crops x height x width) per chunk: bounds the batch's memory (~200 MB of
float32 temporaries), whatever the number of cells."""
ATOL = 1e-4
SOLIDITY_ATOL = 0.01

_LUMA = (0.299, 0.587, 0.114)
_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
# scikit-image `measure.perimeter` (neighborhood=4): weight of each boundary-pixel code
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2

Masks = Sequence[tuple[np.ndarray, np.ndarray]]


def split_crops(
    crops: Sequence[np.ndarray],
    centres: Sequence[tuple[float, float] | None],
    splitter: Splitter | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cell, nucleus) bool masks per crop: the splitter's, or the classical split's."""
    if splitter is not None:
        masks = splitter.split(crops, centres)
        if len(masks) != len(crops):
            raise RuntimeError(f"splitter returned {len(masks)} mask pairs for {len(crops)} crops")
        return list(masks)
    out = []
    for crop, centre in zip(crops, centres, strict=True):
        cell = segment_cell(crop, centre)
        out.append((cell, segment_nucleus(crop, cell)))
    return out


def measure_crops(
    crops: Sequence[np.ndarray],
    centres: Sequence[tuple[float, float] | None],
    scale: float = 1.0,
    *,
    splitter: Splitter | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Features of cell crops: float32 [N, F] in `FEATURE_NAMES` order.

    crops: uint8 [h_i, w_i, 3], each at least `MIN_SIDE_PX` a side (`box_window` crops).
    centres: (y, x) of the wanted cell per crop (None = crop centre). scale: um per px
    (1.0: px). splitter: the learned split, else the classical one. device: where the
    statistics run; None = the splitter's device, else the CPU.
    """
    if device is None:
        device = getattr(splitter, "device", None) or "cpu"
    return mask_features(crops, split_crops(crops, centres, splitter), scale, device=device)


def mask_features(
    crops: Sequence[np.ndarray],
    masks: Masks,
    scale: float = 1.0,
    *,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """float32 [N, F] features of crops (uint8 [h_i, w_i, 3]) from their (cell, nucleus)
    bool [h_i, w_i] masks, as `morphometrics.measure_masks` row by row (module doc: how
    closely). A row whose cell or nucleus (cut to the cell) is empty keeps the default
    zeros with `segmentation_ok = 0`."""
    out = np.zeros((len(crops), len(FEATURE_NAMES)), np.float32)
    boxed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, (crop, (cell, nucleus)) in enumerate(zip(crops, masks, strict=True)):
        cell = np.asarray(cell, dtype=bool)
        nucleus = np.asarray(nucleus, dtype=bool) & cell
        if cell.shape != crop.shape[:2] or nucleus.shape != crop.shape[:2]:
            raise ValueError(f"mask shapes {cell.shape}, {nucleus.shape} != crop {crop.shape[:2]}")
        if not cell.any() or not nucleus.any():
            continue
        # every feature is translation-invariant: keep only the cell's bounding box
        rows, cols = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        c, m, n = crop[box], cell[box], nucleus[box]
        if m.shape[0] > m.shape[1]:  # and transposed (so is every feature)
            c, m, n = c.transpose(1, 0, 2), m.T, n.T
        boxed[i] = (c, m, n)
    dev = torch.device(device)
    valid = list(boxed)
    for chunk in _chunks(valid, [boxed[i][1].shape for i in valid]):
        parts = [boxed[i] for i in chunk]
        out[chunk] = _chunk_features(
            [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], scale, dev
        )
    return out


def _chunks(rows: list[int], shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Rows grouped by crop shape (little padding), at most `CHUNK_PIXELS` padded per group."""
    order = sorted(range(len(rows)), key=lambda k: shapes[k])
    groups: list[list[int]] = []
    current: list[int] = []
    h = w = 0
    for k in order:
        nh, nw = max(h, shapes[k][0]), max(w, shapes[k][1])
        if current and (len(current) + 1) * nh * nw > CHUNK_PIXELS:
            groups.append(current)
            current, nh, nw = [], shapes[k][0], shapes[k][1]
        current.append(rows[k])
        h, w = nh, nw
    if current:
        groups.append(current)
    return groups


def _chunk_features(
    crops: list[np.ndarray],
    cells: list[np.ndarray],
    nuclei: list[np.ndarray],
    scale: float,
    device: torch.device,
) -> np.ndarray:
    b = len(crops)
    h = max(c.shape[0] for c in crops)
    w = max(c.shape[1] for c in crops)
    rgb_np = np.zeros((b, h, w, 3), np.uint8)
    cell_np = np.zeros((b, h, w), bool)
    nuc_np = np.zeros((b, h, w), bool)
    for k, (crop, cell, nucleus) in enumerate(zip(crops, cells, nuclei, strict=True)):
        ch, cw = crop.shape[:2]
        rgb_np[k, :ch, :cw] = crop
        cell_np[k, :ch, :cw] = cell
        nuc_np[k, :ch, :cw] = nucleus
    rgb = torch.from_numpy(rgb_np).to(device).permute(0, 3, 1, 2).float() / 255.0
    cell_t = torch.from_numpy(cell_np).to(device)
    nuc_t = torch.from_numpy(nuc_np).to(device)
    cyto_t = cell_t & ~nuc_t

    c_area, c_per, c_ecc, c_sol = _shape(cell_t)
    n_area, n_per, n_ecc, n_sol = _shape(nuc_t)
    cyto_area = cyto_t.sum((1, 2)).double()
    n_mean, n_std = _colour(rgb, nuc_t)
    y_mean, y_std = _colour(rgb, cyto_t)
    luma = torch.tensor(_LUMA, device=device, dtype=rgb.dtype)
    lum = (rgb * luma[None, :, None, None]).sum(1)
    p05, p95 = _quantiles(lum, cell_t, (0.05, 0.95))
    colour_range = p95 - p05

    cols = {
        "cell_area": c_area * scale**2,
        "nucleus_area": n_area * scale**2,
        "cytoplasm_area": cyto_area * scale**2,
        "cell_perimeter": c_per * scale,
        "nucleus_perimeter": n_per * scale,
        "cell_eccentricity": c_ecc,
        "nucleus_eccentricity": n_ecc,
        "cell_solidity": c_sol,
        "nucleus_solidity": n_sol,
        "nc_ratio": (n_area / cyto_area.clamp(min=1.0)).clamp(max=NC_RATIO_MAX),
        "nucleus_fraction": n_area / c_area,
        "cell_colour_range": colour_range,
        "segmentation_ok": torch.ones(b, device=device),
    }
    for i, ch in enumerate(_CHANNELS):
        cols[f"nucleus_mean_{ch}"] = n_mean[:, i]
        cols[f"nucleus_std_{ch}"] = n_std[:, i]
        cols[f"cytoplasm_mean_{ch}"] = y_mean[:, i]
        cols[f"cytoplasm_std_{ch}"] = y_std[:, i]
    table = torch.stack([cols[name].double() for name in FEATURE_NAMES], dim=1)
    return table.cpu().numpy().astype(np.float32)


def _shape(
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(area, perimeter, eccentricity, solidity), each FloatTensor[B], of bool [B, H, W]
    masks, every mask's pixels taken as one region (as `morphometrics._shape`)."""
    area = mask.sum((1, 2)).double()
    return area, _perimeter(mask), _eccentricity(mask, area), _solidity(mask, area)


def _perimeter(mask: torch.Tensor) -> torch.Tensor:
    """scikit-image `measure.perimeter(neighborhood=4)` per mask, as a sum of shifts."""
    x = mask.to(torch.uint8)
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    up, down = p[:, :-2, 1:-1], p[:, 2:, 1:-1]
    left, right = p[:, 1:-1, :-2], p[:, 1:-1, 2:]
    border = x * (1 - up * down * left * right)  # the mask minus its erosion by a cross
    q = torch.nn.functional.pad(border, (1, 1, 1, 1))
    edges = q[:, :-2, 1:-1] + q[:, 2:, 1:-1] + q[:, 1:-1, :-2] + q[:, 1:-1, 2:]
    corners = q[:, :-2, :-2] + q[:, :-2, 2:] + q[:, 2:, :-2] + q[:, 2:, 2:]
    code = border + 2 * edges + 10 * corners  # <= 49: fits uint8
    weights = torch.as_tensor(_PERIMETER_WEIGHTS, device=mask.device)
    # every weighted code is odd (a border pixel), so only border pixels are looked up
    b, yy, xx = border.nonzero(as_tuple=True)
    per_pixel = weights[code[b, yy, xx].long()]
    return torch.zeros(mask.shape[0], dtype=weights.dtype, device=mask.device).index_add_(
        0, b, per_pixel
    )


def _eccentricity(mask: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Eccentricity of the ellipse with the masks' second central moments (+ 1/12 per
    axis: a unit pixel's own variance, as scikit-image's regionprops)."""
    _, h, w = mask.shape
    m = mask.double()
    yy = torch.arange(h, device=mask.device, dtype=m.dtype)[None, :, None]
    xx = torch.arange(w, device=mask.device, dtype=m.dtype)[None, None, :]
    n = area.clamp(min=1.0)
    my = (m * yy).sum((1, 2)) / n
    mx = (m * xx).sum((1, 2)) / n
    dy = (yy - my[:, None, None]) * m
    dx = (xx - mx[:, None, None]) * m
    cyy = (dy * dy).sum((1, 2)) / n + 1 / 12
    cxx = (dx * dx).sum((1, 2)) / n + 1 / 12
    cxy = (dy * dx).sum((1, 2)) / n
    half_gap = torch.sqrt(((cyy - cxx) / 2) ** 2 + cxy**2)
    major, minor = (cyy + cxx) / 2 + half_gap, (cyy + cxx) / 2 - half_gap
    ratio = torch.where(major > 0, minor / major.clamp(min=1e-12), torch.ones_like(major))
    return torch.sqrt((1 - ratio).clamp(min=0.0))


def _solidity(mask: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """area / convex-hull area (module doc: the hull as `HULL_DIRECTIONS` half-planes).

    The hull of a mask is the hull of its rows' leftmost and rightmost pixels, so the
    support in each direction needs only those; the pixel centres inside form one run per
    row, counted from the half-plane bounds on x.
    """
    _, h, w = mask.shape
    dev = mask.device
    xs = torch.arange(w, device=dev)
    rows = mask.any(2)  # [B, H]
    xmin = torch.where(mask, xs, w).amin(2).double()
    xmax = torch.where(mask, xs, -1).amax(2).double()
    theta = torch.arange(HULL_DIRECTIONS, device=dev, dtype=torch.float64)
    theta = theta * (2 * math.pi / HULL_DIRECTIONS)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cos = torch.where(cos.abs() < 1e-12, torch.zeros_like(cos), cos)
    sin = torch.where(sin.abs() < 1e-12, torch.zeros_like(sin), sin)
    y = torch.arange(h, device=dev, dtype=torch.float64)
    c, s = cos[None, :, None], sin[None, :, None]
    proj = torch.maximum(xmin[:, None, :] * c, xmax[:, None, :] * c) + y[None, None, :] * s
    proj = proj.masked_fill(~rows[:, None, :], -math.inf)
    # support of the pixel-edge midpoints (a diamond of radius 1/2 around each centre)
    support = proj.amax(2) + 0.5 * torch.maximum(cos.abs(), sin.abs())[None, :]  # [B, K]
    rest = support[:, :, None] - y[None, None, :] * s  # x * cos <= rest, [B, K, H]
    tol = 1e-7
    upper = torch.where(c > 0, rest / c.clamp(min=1e-300), math.inf).amin(1)
    lower = torch.where(c < 0, rest / c.clamp(max=-1e-300), -math.inf).amax(1)
    feasible = torch.where(c == 0, rest >= -tol, True).all(1)
    upper = torch.floor(upper.clamp(max=w - 1) + tol)
    lower = torch.ceil(lower.clamp(min=0) - tol)
    runs = ((upper - lower + 1).clamp(min=0) * feasible).sum(1)
    solidity = area / torch.maximum(runs, area).clamp(min=1.0)
    return torch.where(area >= 3, solidity, torch.ones_like(solidity))


def _colour(rgb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation ([B, 3] each) of rgb [B, 3, H, W] over bool
    [B, H, W] masks; zeros for an empty mask."""
    m = mask[:, None].to(rgb.dtype)
    n = m.sum((2, 3)).clamp(min=1.0)
    mean = (rgb * m).sum((2, 3)) / n
    var = (((rgb - mean[:, :, None, None]) * m) ** 2).sum((2, 3)) / n
    return mean, var.sqrt()


def _quantiles(values: torch.Tensor, mask: torch.Tensor, qs: Sequence[float]) -> list[torch.Tensor]:
    """The q-quantiles (numpy's default linear interpolation) of values [B, H, W] in [0, 1]
    over each non-empty bool [B, H, W] mask, FloatTensor[B] per q.

    One sort of the masked values of all crops together (key: crop index + value / 2; the
    indices come out of `nonzero` in order), not of the padded batch."""
    index, yy, xx = mask.nonzero(as_tuple=True)
    base = index.double()
    ordered = (
        torch.sort(base + values[index, yy, xx].double().clamp(0.0, 1.0) / 2).values - base
    ) * 2
    n = mask.flatten(1).sum(1)
    start = torch.cumsum(n, 0) - n
    out = []
    for q in qs:
        pos = q * (n - 1).double()
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, n - 1)
        a, c = ordered[start + lo], ordered[start + hi]
        out.append(a + (c - a) * (pos - lo.double()))
    return out
