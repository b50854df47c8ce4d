"""NPM1 classifier: a whole-image CNN returning P(NPM1 mutated).

Paper: ResNet50 on 2000x1500 images; CPU-sized configs use ResNet18 at a small input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from marrowscope.errors import InvalidInput
from marrowscope.models.common import Normalize, images_to_tensor


class Npm1Classifier(nn.Module):
    """`forward(x FloatTensor[B, 3, H, W] RGB in [0, 1])` -> logits FloatTensor[B].

    H, W should equal the config's `input_size`; `predict_proba` enforces it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        import torchvision

        self.input_size: tuple[int, int] = tuple(config["input_size"])
        self.normalize = Normalize(config["mean"], config["std"])
        self.net = getattr(torchvision.models, config["arch"])(weights=None, num_classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x)).squeeze(-1)  # type: ignore[no-any-return]

    @torch.inference_mode()
    def predict_proba(self, images: Any) -> torch.Tensor:
        """images uint8[B, H, W, 3] or float[B, 3, H, W] at `input_size` -> FloatTensor[B]."""
        x = images_to_tensor(images, next(self.parameters()).device)
        if tuple(x.shape[-2:]) != self.input_size:
            raise InvalidInput(
                f"image size {tuple(x.shape[-2:])} is not the model's input size {self.input_size} (H, W)"
            )
        return self(x).sigmoid().float().cpu()  # type: ignore[no-any-return]

    def backbone(self) -> nn.Module:
        """Everything but the final `fc` (target of backbone-only pretrained weights)."""
        return self.net  # type: ignore[no-any-return]  # torchvision is untyped
