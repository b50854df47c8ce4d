"""Cell detector: torchvision Faster R-CNN (paper: ResNet50-FPN; MobileNetV3-FPN for CPU).

Never downloads anything: `weights=None, weights_backbone=None` always; pretrained
weights come only from a local file (see `marrowscope.models.weights`).

Optional config keys (absent or null: torchvision's defaults, so older configs build the
same model): `anchor_sizes` (one list of anchor side lengths in pixels of the resized image
per FPN level) and `anchor_aspect_ratios` (height / width ratios used on every level).
Hyperparameters passed to `FasterRCNN` when present: see `RPN_ROI_KEYS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models import detection

from marrowscope.models.config import DETECTOR_INT_HYPERPARAMETERS

_BUILDERS = {
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
}

RPN_ROI_KEYS: tuple[str, ...] = (
    *DETECTOR_INT_HYPERPARAMETERS,
    "box_score_thresh",
    "box_nms_thresh",
)
"""`hyperparameters` keys forwarded as `FasterRCNN` keyword arguments."""

_DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def build_detector(config: dict[str, Any]) -> detection.FasterRCNN:
    """Faster R-CNN with `len(config["classes"]) + 1` classes (label 0 = background).

    Label `i >= 1` of the output means `config["classes"][i - 1]`. Images are rescaled
    internally so the short side is `min_size` and the long side at most `max_size`.

    Eval-mode call: `model(images: list[FloatTensor[3, H, W] in [0, 1]])` returns one dict
    per image with `boxes` FloatTensor[N, 4] (x1, y1, x2, y2 pixels of the input image),
    `scores` FloatTensor[N], `labels` Int64Tensor[N]. Train mode additionally takes
    targets (`boxes`, `labels`) and returns a dict of losses.
    """
    hp = config.get("hyperparameters", {})
    extra = {key: hp[key] for key in RPN_ROI_KEYS if key in hp}
    model = _BUILDERS[config["arch"]](
        weights=None,
        weights_backbone=None,
        num_classes=len(config["classes"]) + 1,
        min_size=config["min_size"],
        max_size=config["max_size"],
        **extra,
    )
    sizes, ratios = config.get("anchor_sizes"), config.get("anchor_aspect_ratios")
    if sizes is not None or ratios is not None:
        _set_anchors(model, sizes, ratios)
    return model


def _set_anchors(
    model: detection.FasterRCNN, sizes: list[list[int]] | None, ratios: list[float] | None
) -> None:
    """Replace the RPN anchor generator; rebuild the RPN head when the anchor count changes."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    old = model.rpn.anchor_generator
    levels = len(old.sizes)
    size_t = (
        tuple(tuple(int(s) for s in level) for level in sizes) if sizes is not None else old.sizes
    )
    if len(size_t) != levels:
        raise ValueError(
            f"anchor_sizes has {len(size_t)} levels, the backbone has {levels} FPN levels"
        )
    ratio_t = tuple(float(r) for r in ratios) if ratios is not None else _DEFAULT_RATIOS
    generator = AnchorGenerator(size_t, (ratio_t,) * levels)
    counts = set(generator.num_anchors_per_location())
    if len(counts) != 1:
        raise ValueError(f"every FPN level needs the same number of anchors, got {sorted(counts)}")
    model.rpn.anchor_generator = generator
    n = counts.pop()
    if n != old.num_anchors_per_location()[0]:
        head = model.rpn.head
        conv_depth = len(head.conv)
        channels = head.cls_logits.in_channels
        model.rpn.head = RPNHead(channels, n, conv_depth=conv_depth)


def detector_backbone(model: detection.FasterRCNN) -> torch.nn.Module:
    """The ImageNet-style feature extractor inside the FPN (target of backbone weights)."""
    return model.backbone.body  # type: ignore[no-any-return]  # torchvision is untyped
