"""Device choice and optional mixed precision for handlers.

One implementation serves training, in-process inference and the services:
``select_device("auto"|"cpu"|"cuda")`` (``cuda`` without a GPU is an error, never a silent CPU
fallback) and ``autocast(device, "none"|"fp16"|"bf16")`` (a no-op on CPU), both from
``marrowscope.inference``.
"""

from __future__ import annotations

from marrowscope.inference import autocast_context as autocast
from marrowscope.inference import select_device

__all__ = ["autocast", "select_device"]
