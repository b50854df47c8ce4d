"""Randomised photometric / optical jitter of training batches (`training.photometric`)."""

from __future__ import annotations

import torch

from training.photometric import photometric_jitter


def _batch() -> torch.Tensor:
    x = torch.full((6, 3, 24, 24), 0.85)
    x[:, :, 8:16, 8:16] = torch.tensor([0.35, 0.2, 0.55])[:, None, None]  # a purple "nucleus"
    return x


def test_zero_strength_is_the_identity():
    x = _batch()
    assert torch.equal(photometric_jitter(x, 0.0), x)


def test_jitter_keeps_shape_and_range_and_differs_per_image():
    torch.manual_seed(0)
    x = _batch()
    y = photometric_jitter(x, 1.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(y, x, atol=1e-3)
    glass = y[:, :, :4, :4].mean(dim=(2, 3))  # [B, 3]: each image's background colour moved
    assert float(glass.std(dim=0).max()) > 0.005


def test_the_offsets_stay_within_their_range():
    torch.manual_seed(1)
    x = _batch()
    y = photometric_jitter(x, 0.5)
    # strength 0.5: at most 10 levels background + 10 levels stain + contrast 12.5 % + noise
    assert float((y - x).abs().mean()) < 0.1
