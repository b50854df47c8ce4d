"""Learned nucleus/cytoplasm split: a small U-Net over one cell crop (3 classes).

Why: the classical split (`marrowscope.morphometrics`) finds the nucleus well but lets the
cell region leak into red cells that touch the white cell (measured on another scanner:
cell area +35 % median, N:C error 0.37), and N:C ratio and cell size feed the ensemble.
A U-Net trained on expert masks and on synthetic crowded fields learns where the white
cell ends. The classical split stays as the fallback (no splitter configured, or it fails
to load).

Classes (`NUCSEG_CLASSES`): 0 background (red cells, neighbours included), 1 cytoplasm,
2 nucleus. The cell is every pixel of class 1 or 2, so the nucleus lies inside the cell by
construction. With config `nucleus_source: "classical"` the net only draws the cell and
the classical nucleus detector (`morphometrics.segment_nucleus`) runs inside it: the
classical nucleus is already good (median Dice 0.955 on wbc-seg); its weakness was the cell.
With `nucleus_source: "combined"` the choice is made per cell: the net's nucleus when the
net is decisive inside the cell (`nucleus_confidence`, the mean over cell pixels of
max(p_cytoplasm, p_nucleus) / (p_cytoplasm + p_nucleus), in [0.5, 1]) is at least the
config's `nucleus_confidence_min`, else the classical nucleus inside the net's cell. On a
scanner the net was not trained on, an unsure net is where its nucleus fails (issue 23 §4);
training measures the threshold on its own training cells under random stain shifts.

`LearnedSplitter` is the predictor the segmentation service and the evaluation use: it
implements `marrowscope.morphometrics.Splitter`, batching all crops of an image through
the net at the config's `input_size` and resizing class probabilities back to each crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from marrowscope.errors import InvalidInput
from marrowscope.models.common import Normalize

NUCSEG_CLASSES: tuple[str, ...] = ("background", "cytoplasm", "nucleus")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class NucSegNet(nn.Module):
    """`forward(x FloatTensor[B, 3, H, W] RGB in [0, 1])` -> logits FloatTensor[B, 3, H, W]
    over `NUCSEG_CLASSES`.

    A U-Net with `depth` poolings and `base_channels * 2**level` channels per level; any
    H, W works (the input is padded to a multiple of 2**depth and the logits cropped back),
    but the model was trained at the config's `input_size`, which `LearnedSplitter` uses.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.input_size: tuple[int, int] = tuple(config["input_size"])
        self.depth: int = int(config["depth"])
        base = int(config["base_channels"])
        self.normalize = Normalize(config["mean"], config["std"])
        widths = [base * 2**i for i in range(self.depth + 1)]
        self.down = nn.ModuleList(
            [_block(3, widths[0])]
            + [_block(widths[i - 1], widths[i]) for i in range(1, self.depth + 1)]
        )
        self.up = nn.ModuleList(
            [_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(self.depth))]
        )
        self.head = nn.Conv2d(widths[0], len(NUCSEG_CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        x = self.normalize(x)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits[..., :h, :w]


def crops_to_batch(crops: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [h_i, w_i, 3] crops -> FloatTensor[N, 3, size] in [0, 1] (bilinear, antialiased).

    Each crop is resized on its own (shapes differ), then stacked; empty input gives
    [0, 3, *size]. Raises `InvalidInput` for a crop that is not uint8 [h, w, 3] with h, w >= 1.
    """
    out = torch.empty((len(crops), 3, *size), dtype=torch.float32)
    for i, crop in enumerate(crops):
        if (
            not isinstance(crop, np.ndarray)
            or crop.dtype != np.uint8
            or crop.ndim != 3
            or crop.shape[2] != 3
            or min(crop.shape[:2]) < 1
        ):
            got = getattr(crop, "shape", type(crop).__name__)
            raise InvalidInput(f"crop {i} must be uint8 [h, w, 3] with h, w >= 1, got {got}")
        t = torch.from_numpy(np.array(crop, copy=True)).permute(2, 0, 1)[None].float() / 255.0
        out[i] = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
    return out


class LearnedSplitter:
    """Nucleus/cytoplasm split by a `NucSegNet` (a `marrowscope.morphometrics.Splitter`).

    `split(crops, centres)` returns one (cell bool[h, w], nucleus bool[h, w]) per crop:
    class probabilities at `input_size` are resized back to the crop (bilinear) and
    arg-maxed; the cell keeps only its component nearest `centre` (y, x; None = crop centre),
    as the classical split does, and the nucleus is cut to the cell. Crops run in batches
    of `batch_size` on `device`.
    """

    kind = "nucseg"
    name = "learned"

    def __init__(
        self,
        module: NucSegNet,
        config: dict[str, Any],
        *,
        device: str | torch.device = "cpu",
        version: str = "",
        batch_size: int = 64,
    ) -> None:
        if config.get("kind") != self.kind:
            raise InvalidInput(f"LearnedSplitter needs a nucseg model, got {config.get('kind')}")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.config = config
        self.version = version
        self.batch_size = batch_size
        self.input_size: tuple[int, int] = tuple(config["input_size"])
        self.nucleus_source: str = config.get("nucleus_source", "learned")
        self.confidence_min = float(config.get("nucleus_confidence_min", 0.0))

    @classmethod
    def from_dir(
        cls, directory: Any, *, device: str = "cpu", version: str | None = None
    ) -> LearnedSplitter:
        """Load a saved nucseg model directory (safetensors + config.json)."""
        from marrowscope.inference import select_device
        from marrowscope.models import load_model

        loaded = load_model(directory)
        if loaded.config["kind"] != cls.kind or not isinstance(loaded.module, NucSegNet):
            raise InvalidInput(f"{directory} holds a {loaded.config['kind']} model, not nucseg")
        return cls(
            loaded.module,
            loaded.config,
            device=select_device(device),
            version=version or f"local-{loaded.digest[:12]}",
        )

    @torch.inference_mode()
    def probabilities(self, crops: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Class probabilities FloatTensor[3, h_i, w_i] per crop (softmax over the classes)."""
        out: list[torch.Tensor] = []
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start : start + self.batch_size]
            x = crops_to_batch(chunk, self.input_size).to(self.device)
            probs = self.module(x).float().softmax(1)
            for p, crop in zip(probs, chunk, strict=True):
                size = crop.shape[:2]
                p = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0]
                out.append(p.cpu())
        return out

    def split(
        self,
        crops: Sequence[np.ndarray],
        centres: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        centres = [None] * len(crops) if centres is None else list(centres)
        if len(centres) != len(crops):
            raise InvalidInput(f"{len(crops)} crops but {len(centres)} centres")
        out = []
        for crop, probs, centre in zip(crops, self.probabilities(crops), centres, strict=True):
            options = split_options(crop, probs, centre)
            out.append(options.pick(self.nucleus_source, self.confidence_min))
        return out


class SplitOptions:
    """The splits one crop's class probabilities allow: the net's `cell` (bool [h, w]), its
    own `learned` nucleus, the `classical` nucleus inside that cell (computed on first
    use), and the net's `confidence` about nucleus vs cytoplasm inside the cell."""

    def __init__(
        self, crop: np.ndarray, cell: np.ndarray, learned: np.ndarray, confidence: float
    ) -> None:
        self.crop, self.cell, self.learned, self.confidence = crop, cell, learned, confidence
        self._classical: np.ndarray | None = None

    @property
    def classical(self) -> np.ndarray:
        if self._classical is None:
            from marrowscope.morphometrics import segment_nucleus

            self._classical = segment_nucleus(self.crop, self.cell) & self.cell
        return self._classical

    def pick(self, source: str, confidence_min: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(cell, nucleus) for `nucleus_source` `source` (see the module doc)."""
        if source == "learned" or (source == "combined" and self.confidence >= confidence_min):
            return self.cell, self.learned
        if source in ("classical", "combined"):
            return self.cell, self.classical
        raise InvalidInput(f"unknown nucleus_source {source!r}")


def split_options(
    crop: np.ndarray, probs: torch.Tensor, centre: tuple[float, float] | None
) -> SplitOptions:
    """`SplitOptions` of a crop (uint8 [h, w, 3]) from its class probabilities
    (FloatTensor[3, h, w], `LearnedSplitter.probabilities`); the cell keeps its component
    nearest `centre` (y, x; None = the crop centre)."""
    from marrowscope.morphometrics import central_component

    label = probs.argmax(0).numpy()
    cell = label > 0
    if cell.any():
        cell = central_component(cell, centre)
    p = probs.numpy()
    inside = p[1:, cell]
    decisive = inside.max(0) / np.maximum(inside.sum(0), 1e-6)
    confidence = float(decisive.mean()) if cell.any() else 0.0
    return SplitOptions(crop, cell, (label == 2) & cell, confidence)
