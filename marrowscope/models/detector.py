"""Cell detector: torchvision Faster R-CNN (paper: ResNet50-FPN; MobileNetV3-FPN for CPU).

Never downloads anything: `weights=None, weights_backbone=None` always; pretrained
weights come only from a local file (see `marrowscope.models.weights`).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models import detection

_BUILDERS = {
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
}


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
    extra = {
        key: hp[key]
        for key in (
            "box_detections_per_img",
            "box_score_thresh",
            "box_nms_thresh",
            "rpn_post_nms_top_n_test",
        )
        if key in hp
    }
    return _BUILDERS[config["arch"]](
        weights=None,
        weights_backbone=None,
        num_classes=len(config["classes"]) + 1,
        min_size=config["min_size"],
        max_size=config["max_size"],
        **extra,
    )


def detector_backbone(model: detection.FasterRCNN) -> torch.nn.Module:
    """The ImageNet-style feature extractor inside the FPN (target of backbone weights)."""
    return model.backbone.body
