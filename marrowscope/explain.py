"""Occlusion sensitivity: which regions and which cells a whole-image model relied on.

Two modes, as in docs/CONTRACTS.md:
- `grid`: Captum's `Occlusion` slides a window over the image (window, stride in pixels) and
  records how much the model's output drops when each region is replaced by the baseline.
- `cells`: each detected cell is replaced by the baseline in turn; one forward pass per cell
  gives that cell's importance. At the paper's 2000x1500 input this costs N passes for N
  cells instead of roughly (H/stride)*(W/stride) passes for a dense grid.

The baseline is the slide's background colour (per-channel median of the image): occluding a
cell with it approximates "this cell was not there", which a grey patch does not.
Pure tensor code: the explain service and the benchmarks call it; no grpc here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from marrowscope.errors import InvalidInput

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps FloatTensor[B, 3, H, W] (RGB in [0, 1]) to the explained score FloatTensor[B]."""


def background_baseline(x: torch.Tensor) -> torch.Tensor:
    """Per-channel median of `x` FloatTensor[1, 3, H, W] -> FloatTensor[1, 3, 1, 1]."""
    return x.flatten(2).median(dim=2).values[..., None, None]


def _check_image(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise InvalidInput(f"expected one RGB image FloatTensor[1, 3, H, W], got {tuple(x.shape)}")


def occlusion_grid(
    forward: ForwardFn, x: torch.Tensor, *, window: int, stride: int, batch_size: int = 16
) -> np.ndarray:
    """Dense occlusion map.

    Args:
        forward: the explained score function (see `ForwardFn`).
        x: FloatTensor[1, 3, H, W], RGB in [0, 1], on the model's device.
        window, stride: square occlusion window and its step, in pixels of `x`.
        batch_size: occluded copies evaluated per forward pass.

    Returns:
        float32[H, W]: the score drop when the pixel's neighbourhood is occluded (Captum
        averages overlapping windows); positive = the region supported the score.
    """
    from captum.attr import Occlusion

    _check_image(x)
    height, width = x.shape[-2:]
    if not 0 < stride <= window <= min(height, width):
        raise InvalidInput(
            f"need 0 < stride <= window <= image side; got window={window}, stride={stride} "
            f"for a {height}x{width} image"
        )
    attribution = Occlusion(forward).attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=background_baseline(x),
        perturbations_per_eval=batch_size,
    )
    heatmap: np.ndarray = attribution[0].sum(0).float().cpu().numpy() / 3.0
    return heatmap


def _clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise InvalidInput(
            f"boxes must be finite float32[N, 4] x1,y1,x2,y2; got shape {boxes.shape}"
        )
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return np.round(out).astype(np.int64)


@torch.inference_mode()
def occlusion_cells(
    forward: ForwardFn, x: torch.Tensor, boxes: np.ndarray, *, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell occlusion.

    Args:
        forward: the explained score function (see `ForwardFn`).
        x: FloatTensor[1, 3, H, W], RGB in [0, 1], on the model's device.
        boxes: float32[N, 4] cell boxes x1, y1, x2, y2 in pixels of `x` (clipped to it).
        batch_size: occluded copies evaluated per forward pass.

    Returns:
        (importance float32[N], heatmap float32[H, W]): importance = score(image) -
        score(image with the cell's box filled with the background); the heatmap paints each
        box with its importance (the larger absolute value where boxes overlap).
    """
    _check_image(x)
    height, width = x.shape[-2:]
    clipped = _clip_boxes(boxes, height, width)
    base = background_baseline(x)
    reference = forward(x).reshape(-1)[0]
    importance = np.zeros(len(clipped), dtype=np.float32)
    for start in range(0, len(clipped), batch_size):
        chunk = clipped[start : start + batch_size]
        batch = x.repeat(len(chunk), 1, 1, 1)
        for i, (x1, y1, x2, y2) in enumerate(chunk):
            batch[i, :, y1:y2, x1:x2] = base[0]
        scores = forward(batch).reshape(-1)
        importance[start : start + len(chunk)] = (reference - scores).float().cpu().numpy()
    heatmap = np.zeros((height, width), dtype=np.float32)
    for (x1, y1, x2, y2), value in sorted(
        zip(clipped, importance, strict=True), key=lambda item: abs(item[1])
    ):
        heatmap[y1:y2, x1:x2] = value
    return importance, heatmap


def pointing_game_ratio(
    heatmap: np.ndarray, target_mask: np.ndarray, top_fraction: float = 0.1
) -> float:
    """How much more often the top `top_fraction` of importance falls on the target.

    Returns (share of top-importance pixels inside `target_mask`) / (share of the image the
    target covers): 1.0 is chance, larger means the map points at the target. NaN when the
    target is empty.
    """
    if heatmap.shape != target_mask.shape:
        raise InvalidInput(f"heatmap {heatmap.shape} and mask {target_mask.shape} differ")
    area_share = float(target_mask.mean())
    if area_share == 0.0:
        return float("nan")
    k = max(1, int(round(top_fraction * heatmap.size)))
    top = np.argpartition(heatmap.ravel(), -k)[-k:]
    return float(target_mask.ravel()[top].mean()) / area_share
