"""Randomised photometric and optical jitter of training batches (issue 23 §2): the shift
families of the generalisation suite (`training.shifts`: background and stain colour,
contrast, blur/defocus, compression), drawn at random per image over a range that covers
the suite's fixed magnitudes, never at those exact values.

Why on top of `stain_jitter`: HED/YIQ jitter moves colour in stain space, but the typer
fell from macro-F1 0.77 to 0.62 on later patients of the same institution and 0.52 on
another scanner; what differs there is also the white balance of the glass, contrast,
focus and compression, which stain-space jitter does not produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOUR_LEVELS = 20.0
"""Largest background / stain offset per channel at strength 1, in grey levels (the suite
shifts by 10)."""
CONTRAST = 0.25
"""Contrast factor U(1 - c, 1 + c) at strength 1 (the suite: x0.8 and x1.2)."""
BLUR_SIGMA = 1.0
"""Largest Gaussian blur sigma at strength 1, in crop pixels; applied to half the images."""
NOISE = 0.02
"""Largest per-pixel Gaussian noise sigma at strength 1 (a stand-in for JPEG and sensor
noise, which torch cannot compress)."""


def _uniform(b: int, lo: float, hi: float, *shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(b, *shape, device=like.device, dtype=like.dtype) * (hi - lo) + lo


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of x [B, 3, S, S]; sigma [B] in pixels (0 = unchanged)."""
    b, c = x.shape[:2]
    radius = max(1, int(torch.ceil(sigma.max() * 2.5)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # [B, K]
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # one kernel per image-channel, grouped conv
    y = F.pad(x.reshape(1, b * c, *x.shape[2:]), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(x.shape)


def photometric_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """x FloatTensor[B, 3, S, S] in [0, 1] -> same shape, jittered per image:
    background offset (weighted by brightness, as a white-balance change moves the glass),
    stain offset (weighted by density), contrast about the image mean, Gaussian blur on
    half the images, Gaussian noise. `strength` scales every range; 0 returns x."""
    if strength <= 0:
        return x
    b, s = x.shape[0], float(strength)
    levels = COLOUR_LEVELS * s / 255.0
    brightness = x.mean(dim=1, keepdim=True)
    x = x + brightness * _uniform(b, -levels, levels, 3, 1, 1, like=x)
    x = x + (1 - brightness) * 2 * _uniform(b, -levels, levels, 3, 1, 1, like=x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * _uniform(b, 1 - CONTRAST * s, 1 + CONTRAST * s, 1, 1, 1, like=x)
    sigma = _uniform(b, 0.0, BLUR_SIGMA * s, like=x)
    sigma = torch.where(torch.rand(b, device=x.device) < 0.5, sigma, torch.zeros_like(sigma))
    if bool((sigma > 0.05).any()):
        x = torch.where((sigma > 0.05)[:, None, None, None], _blur(x, sigma), x)
    x = x + torch.randn_like(x) * _uniform(b, 0.0, NOISE * s, 1, 1, 1, like=x)
    return x.clamp(0.0, 1.0)
