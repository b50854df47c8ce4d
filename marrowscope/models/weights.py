"""Pretrained initial weights from a LOCAL file (transfer learning without downloads).

Accepts safetensors, or a torchvision/timm `.pth` state dict read with
`torch.load(weights_only=True)` (tensors and plain containers only, no code execution).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from marrowscope.models.io import ModelFormatError

log = logging.getLogger(__name__)

_PREFIXES = ("", "module.", "model.", "backbone.", "features.", "backbone.body.", "net.")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (safetensors or weights-only torch file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"initial weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not a weights-only torch file: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFormatError(f"{path} does not hold a state dict of tensors")
    return obj


def _target(module: Any, config: dict[str, Any], scope: str) -> nn.Module:
    if scope == "full":
        return cast(nn.Module, module)
    if scope != "backbone":
        raise ValueError(f"scope must be 'full' or 'backbone', got {scope!r}")
    kind = config["kind"]
    if kind == "detector":
        return cast(nn.Module, module.backbone.body)
    if kind == "celltype":
        return cast(nn.Module, module.backbone)
    if kind == "npm1":
        return cast(nn.Module, module.net)
    raise ValueError("the ensemble MLP has no backbone; use scope='full'")


def load_initial_weights(
    module: nn.Module,
    config: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    scope: str = "backbone",
) -> int:
    """Copy matching tensors from `path` into `module` (or its backbone); return the count.

    Keys are matched after stripping the common prefix that fits best (`module.`,
    `features.`, ...); tensors whose shape differs (e.g. a 1000-class ImageNet `fc`) are
    skipped and logged. Raises `ModelFormatError` when nothing matches.
    """
    source = read_state_dict(path)
    target = _target(module, config, scope)
    own = target.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in _PREFIXES:
        cand = {
            k[len(prefix) :]: v
            for k, v in source.items()
            if k.startswith(prefix)
            and k[len(prefix) :] in own
            and own[k[len(prefix) :]].shape == v.shape
        }
        if len(cand) > len(best):
            best = cand
    if not best:
        raise ModelFormatError(
            f"no tensor in {path} matches the {config['arch']} {scope} by name and shape"
        )
    target.load_state_dict(best, strict=False)
    log.info(
        "initial weights %s: loaded %d/%d %s tensors (%d file tensors unused)",
        path,
        len(best),
        len(own),
        scope,
        len(source) - len(best),
    )
    return len(best)
