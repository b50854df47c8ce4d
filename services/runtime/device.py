"""Device choice and optional mixed precision for handlers (torch imported when called).

``select_device("auto")`` is CUDA when available, else CPU; ``"cuda"`` without a GPU is an
error rather than a silent CPU fallback. ``autocast(device, "fp16"|"bf16")`` is a
``torch.autocast`` context on CUDA and a no-op on CPU or with ``"none"``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def select_device(setting: str = "auto") -> torch.device:
    """torch.device for the ``DEVICE`` setting (``auto|cpu|cuda``)."""
    import torch

    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"DEVICE must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast(device: torch.device, mode: str = "none") -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference (``AUTOCAST`` setting: ``none|fp16|bf16``)."""
    import torch

    if mode not in ("none", "fp16", "bf16"):
        raise ValueError(f"AUTOCAST must be none, fp16 or bf16, got {mode!r}")
    if mode == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)
