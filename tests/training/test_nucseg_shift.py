"""Robustness pieces of the learned nucleus split (issue 23 §4): random scanner shifts for
training, the combined rule's threshold, and the summary over the evaluation shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import nucseg_shift
from training.shifts import SHIFT_NAMES, apply_shift


def _batch() -> torch.Tensor:
    """Two 24x24 'cells': pale background, violet cytoplasm, dark nucleus, in [0, 1]."""
    x = torch.full((2, 3, 24, 24), 0.92)
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    r2 = (yy - 12) ** 2 + (xx - 12) ** 2
    x[:, :, r2 < 64] = torch.tensor([0.78, 0.67, 0.82])[None, :, None]
    x[:, :, r2 < 16] = torch.tensor([0.35, 0.16, 0.55])[None, :, None]
    return x


def test_random_scanner_is_seeded_in_range_and_varies_per_image():
    x = _batch()
    a = nucseg_shift.random_scanner(x, torch.Generator().manual_seed(0))
    b = nucseg_shift.random_scanner(x, torch.Generator().manual_seed(0))
    c = nucseg_shift.random_scanner(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a[0], a[1])  # one draw per image, not per batch
    assert float((a - x).abs().mean()) > 0.005


def test_blur_with_zero_sigma_keeps_the_image_and_positive_sigma_smooths():
    x = _batch()
    same = nucseg_shift._blur(x, torch.zeros(2))
    assert torch.allclose(same, x, atol=1e-5)
    smooth = nucseg_shift._blur(x, torch.tensor([1.0, 1.0]))
    assert float(smooth.diff(dim=-1).abs().max()) < float(x.diff(dim=-1).abs().max())


def test_shift_crop_keeps_shape_and_dtype():
    crop = (_batch()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = nucseg_shift.shift_crop(crop, torch.Generator().manual_seed(3))
    assert out.shape == crop.shape and out.dtype == np.uint8 and not np.array_equal(out, crop)


def _records(dice: float, cls: str = "lymphocyte") -> list[dict]:
    rec = {"nucleus_dice": dice, "cell_dice": dice, "nc_abs_err": 1 - dice}
    return [{"id": "1", "class": cls, "segmentation_ok": 1.0, **rec}]


def test_summary_over_shifts_leaves_out_the_unshifted_and_names_the_worst():
    by_shift = {name: _records(0.9) for name in SHIFT_NAMES}
    by_shift["none"] = _records(1.0)
    by_shift["defocus"] = _records(0.5)
    out = nucseg_shift.summarise_shifts(by_shift, "test")
    over = out["over_shifts"]
    assert over["nucleus_dice"]["worst"] == 0.5 and over["nucleus_dice"]["worst_shift"] == "defocus"
    assert over["nc_abs_err"]["worst"] == 0.5 and over["nc_abs_err"]["worst_shift"] == "defocus"
    n = len(SHIFT_NAMES) - 1
    assert over["nucleus_dice"]["mean"] == pytest.approx((0.9 * (n - 1) + 0.5) / n, abs=1e-4)
    assert out["over_shifts_per_class"]["lymphocyte"]["cell_dice"]["worst"] == 0.5
    assert set(out["shifts"]) == set(SHIFT_NAMES)


def test_random_draws_are_not_the_fixed_evaluation_shifts():
    """Training never sees an evaluation shift's exact pixels (issue 23 §4)."""
    crop = (_batch()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    gen = torch.Generator().manual_seed(0)
    draws = [nucseg_shift.shift_crop(crop, gen) for _ in range(20)]
    for name in SHIFT_NAMES[1:]:
        fixed = apply_shift(crop, name)
        assert not any(np.array_equal(d, fixed) for d in draws), name


def test_scale_shifts_move_the_truth_with_the_cell_and_others_leave_it():
    """Scored under a pixel-size shift, the expert masks must be resampled as the image is
    (else a perfect split would score ~0.8 Dice against the unmoved masks)."""
    from training.shifts import get_shift

    yy, xx = np.ogrid[:60, :60]
    r2 = (yy - 30) ** 2 + (xx - 30) ** 2
    label = np.where(r2 < 100, 2, np.where(r2 < 400, 1, 0)).astype(np.uint8)
    cell, nucleus = nucseg_shift.shifted_truth(label, get_shift("scale_up"))
    assert abs(cell.sum() / (label > 0).sum() - 1.15**2) < 0.05
    assert abs(nucleus.sum() / (label == 2).sum() - 1.15**2) < 0.08 and not (nucleus & ~cell).any()
    small, _ = nucseg_shift.shifted_truth(label, get_shift("scale_down"))
    assert abs(small.sum() / (label > 0).sum() - 0.85**2) < 0.05
    same_cell, same_nucleus = nucseg_shift.shifted_truth(label, get_shift("defocus"))
    assert np.array_equal(same_cell, label > 0) and np.array_equal(same_nucleus, label == 2)
