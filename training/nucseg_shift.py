"""The learned nucleus/cytoplasm split on a scanner it was not trained on (issue 23 §4).

Three pieces, used by `training.nucseg`:

- `random_scanner(x, gen)`: randomised photometric shifts for training (background white
  balance and stain colour offsets, contrast, blur, sensor noise). They are drawn from
  ranges that cover `training.shifts` but never reproduce one of its fixed evaluation
  shifts exactly; the scale shift is covered by the zoom of `nucseg.augment`.
- `calibrate_confidence(...)`: the `nucleus_confidence_min` of the per-cell "combined"
  rule (`marrowscope.models.nucseg`), measured on the model's own training cells under
  random scanner shifts (never on held-out cells or the evaluation shifts).
- `shifted_records(...)` and `summarise_shifts(...)`: every split scored on held-out
  cells under each shift of `training.shifts.SHIFTS`, summarised per shift, as the mean
  and the worst over the shifts, per class too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from marrowscope.models.nucseg import LearnedSplitter
    from training.nucseg import Cells
    from training.shifts import Shift

log = logging.getLogger(__name__)

#: the splits scored under shifts: classical, and the net's cell with each nucleus source
SHIFT_SPLITS: tuple[str, ...] = (
    "classical",
    "learned_learned",
    "learned_classical",
    "learned_combined",
)
#: candidate thresholds of the combined rule; 0 = always the net's nucleus, 1.01 = never
CONFIDENCE_GRID: tuple[float, ...] = (0.0, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.01)
_KEYS = ("nucleus_dice", "cell_dice", "nc_abs_err")


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of x [B, C, H, W] with one sigma (px) per image (0 = unchanged)."""
    import torch
    from torch.nn import functional as F

    b, c, h, w = x.shape
    taps = torch.arange(-3, 4, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = kernel.repeat_interleave(c, 0)  # [B*C, 7], one per image channel
    flat = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def random_scanner(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x FloatTensor[B, 3, H, W] RGB in [0, 1] -> the same under a random other scanner.

    Per image: background offset (weight = brightness, as `shifts._background`) and stain
    offset (weight = stain density, as `shifts._stain`) of up to +-16 grey levels per
    channel, contrast x0.7-1.3 about the image mean, Gaussian blur (half the images,
    sigma 0.2-1.2 px at the net's input size) and pixel noise (a stand-in for JPEG).
    """
    import torch

    b = x.shape[0]

    def uniform(shape: Sequence[int], low: float, high: float) -> torch.Tensor:
        return torch.empty(*shape).uniform_(low, high, generator=gen)

    brightness = x.mean(1, keepdim=True)
    x = x + brightness * uniform((b, 3, 1, 1), -16 / 255, 16 / 255)
    x = x + (1 - brightness) * 2 * uniform((b, 3, 1, 1), -16 / 255, 16 / 255)
    mean = x.mean((2, 3), keepdim=True)
    x = mean + (x - mean) * uniform((b, 1, 1, 1), 0.7, 1.3)
    blurred = torch.rand(b, generator=gen) < 0.5
    sigma = torch.where(blurred, uniform((b,), 0.2, 1.2), torch.zeros(b))
    x = torch.where(blurred[:, None, None, None], _blur(x, sigma), x)
    noise = torch.randn(x.shape, generator=gen) * uniform((b, 1, 1, 1), 0.0, 0.02)
    return (x + noise).clamp(0, 1)


def shift_crop(crop: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """A uint8 [h, w, 3] crop under one `random_scanner` draw, at its own size."""
    import torch

    x = torch.from_numpy(np.array(crop, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    y = random_scanner(x, gen)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(y * 255), 0, 255).astype(np.uint8)


def _record(
    cell: np.ndarray, nucleus: np.ndarray, cell_truth: np.ndarray, nucleus_truth: np.ndarray
) -> dict[str, float]:
    """The `evaluate_morphometrics.compare` keys from masks (no features measured)."""
    from training.evaluate_morphometrics import dice, nc_ratio

    pred_nc, true_nc = nc_ratio(nucleus, cell), nc_ratio(nucleus_truth, cell_truth)
    return {
        "nucleus_dice": dice(nucleus, nucleus_truth),
        "cell_dice": dice(cell, cell_truth),
        "nc_pred": pred_nc,
        "nc_true": true_nc,
        "nc_abs_err": abs(pred_nc - true_nc),
        "segmentation_ok": float(cell.any() and nucleus.any()),
    }


def shifted_truth(label: np.ndarray, shift: Shift) -> tuple[np.ndarray, np.ndarray]:
    """(cell, nucleus) bool [h, w] truth of a crop's label (0 bg, 1 cytoplasm, 2 nucleus)
    as it lies in the shifted crop: a scale shift moves the cell, so its masks take the same
    resampling (bilinear, cut at half); photometric and optical shifts leave them."""
    cell, nucleus = label > 0, label == 2
    if shift.family != "scale":
        return cell, nucleus

    def move(mask: np.ndarray) -> np.ndarray:
        moved = shift(np.repeat(mask.astype(np.uint8)[..., None] * 255, 3, axis=2))
        out: np.ndarray = moved[..., 0] > 127
        return out

    moved_cell = move(cell)
    return moved_cell, move(nucleus) & moved_cell


def _options(splitter: LearnedSplitter, crops: list[np.ndarray], centres: list[Any]) -> list[Any]:
    from marrowscope.models.nucseg import split_options

    return [
        split_options(crop, probs, centre)
        for crop, probs, centre in zip(crops, splitter.probabilities(crops), centres, strict=True)
    ]


def calibrate_confidence(
    cells: Cells, splitter: LearnedSplitter, *, seed: int, repeats: int = 2
) -> tuple[float, dict[str, float]]:
    """The threshold of `CONFIDENCE_GRID` whose combined nucleus has the best median Dice
    on `cells` (the model's training cells) under `repeats` random scanner draws each;
    ties keep the lower threshold (more of the net). Returns (threshold, Dice by threshold)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dices: dict[float, list[float]] = {t: [] for t in CONFIDENCE_GRID}
    for _ in range(repeats):
        crops = [shift_crop(c, gen) for c in cells.crops]
        for opts, label in zip(_options(splitter, crops, cells.centres), cells.labels, strict=True):
            for t in CONFIDENCE_GRID:
                cell, nucleus = opts.pick("combined", t)
                dices[t].append(_record(cell, nucleus, label > 0, label == 2)["nucleus_dice"])
    medians = {str(t): round(float(np.median(v)), 4) for t, v in dices.items()}
    best = max(CONFIDENCE_GRID, key=lambda t: (medians[str(t)], -t))
    return best, medians


def shifted_records(
    cells: Cells, splitter: LearnedSplitter, confidence_min: float
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{split: {shift: records}} for every split of `SHIFT_SPLITS` and every shift of
    `training.shifts.SHIFTS` on `cells` (held-out cells with ground truth)."""
    from marrowscope.morphometrics import segment_cell, segment_nucleus
    from training.shifts import SHIFTS

    out: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in SHIFT_SPLITS}
    for shift in SHIFTS:
        crops = [shift(c) for c in cells.crops]
        options = _options(splitter, crops, cells.centres)
        for i, (crop, opts) in enumerate(zip(crops, options, strict=True)):
            truth = shifted_truth(cells.labels[i], shift)
            meta = {"id": cells.ids[i], "class": cells.classes[i]}
            cell = segment_cell(crop, cells.centres[i])
            masks = {
                "classical": (cell, segment_nucleus(crop, cell) & cell),
                "learned_learned": opts.pick("learned"),
                "learned_classical": opts.pick("classical"),
                "learned_combined": opts.pick("combined", confidence_min),
            }
            for split, (c, n) in masks.items():
                out[split].setdefault(shift.name, []).append({**meta, **_record(c, n, *truth)})
    return out


def summarise_shifts(records: dict[str, list[dict[str, Any]]], dataset: str) -> dict[str, Any]:
    """One split's {shift: records} -> per-shift summaries (`evaluate_morphometrics.
    summarise`), and `mean_over_shifts` / `worst_shift` of each median (worst = lowest
    Dice, highest N:C error; with the shift's name), overall and per class."""
    from training.evaluate_morphometrics import summarise

    per_shift = {
        name: summarise(recs, dataset=f"{dataset}, shift {name}", synthetic=False)
        for name, recs in records.items()
    }
    shifted = {n: s for n, s in per_shift.items() if n != "none"}

    def fold(values: dict[str, float], key: str) -> dict[str, Any]:
        pick = max if key == "nc_abs_err" else min
        worst = pick(values, key=lambda n: values[n])
        return {
            "mean": round(float(np.mean(list(values.values()))), 4),
            "worst": values[worst],
            "worst_shift": worst,
        }

    overall = {k: fold({n: s[f"{k}_median"] for n, s in shifted.items()}, k) for k in _KEYS}
    classes = sorted({c for s in shifted.values() for c in s["per_class"]})
    per_class = {
        c: {
            k: fold(
                {
                    n: s["per_class"][c][k]["median"]
                    for n, s in shifted.items()
                    if c in s["per_class"]
                },
                k,
            )
            for k in _KEYS
        }
        for c in classes
    }
    return {"shifts": per_shift, "over_shifts": overall, "over_shifts_per_class": per_class}
