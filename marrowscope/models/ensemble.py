"""Ensemble net (the paper's "ENN"): an MLP from the case feature vector to P(AML).

An ensemble may have a second output (config `targets: ["aml", "npm1"]`): P(NPM1 mutated |
AML) from the same features. The blast attribute fractions in the vector (cup-like nuclei,
nucleoli, condensed chromatin) are the morphology hematologists read for NPM1; the head
shares the hidden layers and is trained on AML cases with a known NPM1 status only.

The input order is the config's `feature_names` (built by `marrowscope.features`).
Standardisation statistics are fitted on training data and stored as persistent buffers,
so they travel inside `model.safetensors` with the weights they were trained with.

Morphometric features (areas, perimeters) depend on the pixel size: um^2 when the images
had one, px^2 when not. The config's `feature_units` records which unit the net learned
(`marrowscope.models.config.feature_units`); serving refuses to report a P(AML) from
features in another unit (docs/CONTRACTS.md), since standardisation would turn a px^2 area
into an extreme z-score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from marrowscope.errors import InvalidInput


class EnsembleNet(nn.Module):
    """`forward(x FloatTensor[B, F])` -> logits FloatTensor[B] (P(AML) = sigmoid) for a
    single-target net, FloatTensor[B, T] (columns in `targets` order) for several."""

    # registered buffers (FloatTensor[F]): declared so they type as tensors, not as
    # nn.Module.__getattr__'s Tensor | Module
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from marrowscope.models.config import ensemble_targets

        self.targets: list[str] = ensemble_targets(config)
        self.feature_names: list[str] = list(config["feature_names"])
        n = len(self.feature_names)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        layers: list[nn.Module] = []
        width = n
        for hidden in config["hidden"]:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config["dropout"])]
            width = hidden
        layers.append(nn.Linear(width, len(self.targets)))
        self.mlp = nn.Sequential(*layers)

    @torch.no_grad()
    def fit_standardisation(self, features: Any) -> None:
        """Set mean/std from training features float[N, F] (N >= 1; std floor 1e-6)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != len(self.feature_names) or x.shape[0] == 0:
            raise InvalidInput(
                f"features must be [N>=1, {len(self.feature_names)}], got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise InvalidInput("features contain NaN or infinite values")
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.mlp((x - self.feature_mean) / self.feature_std)
        return logits.squeeze(-1) if len(self.targets) == 1 else logits

    @torch.inference_mode()
    def predict_proba(self, features: Any, names: list[str] | None = None) -> torch.Tensor:
        """features float[B, F] -> P(AML) FloatTensor[B] on CPU (see `predict_targets`)."""
        return self.predict_targets(features, names)["aml"]

    @torch.inference_mode()
    def predict_targets(
        self, features: Any, names: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """features float[B, F] -> {target: probability FloatTensor[B] on CPU} for every target.

        When `names` is given it must equal `feature_names` exactly (same order); a case
        vector built by another feature version is refused rather than silently misread.
        """
        if names is not None and list(names) != self.feature_names:
            missing = sorted(set(self.feature_names) - set(names))
            extra = sorted(set(names) - set(self.feature_names))
            raise InvalidInput(
                "feature names differ from the model's "
                f"(missing {missing[:5]}, unexpected {extra[:5]}, or a different order)"
            )
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise InvalidInput(
                f"features must be [B, {len(self.feature_names)}], got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise InvalidInput("features contain NaN or infinite values")
        device = self.feature_mean.device
        p = self(x.to(device)).sigmoid().float().cpu().reshape(x.shape[0], len(self.targets))
        return {t: p[:, i] for i, t in enumerate(self.targets)}
