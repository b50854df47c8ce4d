"""Pieces shared by the image models: input conversion and in-module normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from marrowscope.errors import InvalidInput


def images_to_tensor(images: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Batch of images -> FloatTensor[B, 3, H, W] in [0, 1].

    Accepts uint8 (numpy or torch) [B, H, W, 3] channels-last, as sent over the wire, or a
    float tensor already shaped [B, 3, H, W] in [0, 1] (passed through).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise InvalidInput(f"images must be an array or tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise InvalidInput(
            f"images must be 4-D [B, H, W, 3] or [B, 3, H, W], got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise InvalidInput(f"uint8 images must be [B, H, W, 3], got {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
    elif images.is_floating_point():
        if images.shape[1] != 3:
            raise InvalidInput(f"float images must be [B, 3, H, W], got {tuple(images.shape)}")
        images = images.float()
    else:
        raise InvalidInput(f"images must be uint8 or float, got {images.dtype}")
    return images.to(device) if device is not None else images  # type: ignore[no-any-return]


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean/std come from the config, so they are
    non-persistent buffers (not part of the weights file, one source of truth)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
