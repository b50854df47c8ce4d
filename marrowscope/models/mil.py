"""Attention-based multiple-instance learning (MIL) over a case's cell embeddings: P(APL | AML).

Gated-attention pooling of Ilse et al. (ICML 2018), the aggregation SCEMILA and DeepAPL use:
every cell of a case (a "bag") is the penultimate embedding float[D] of the celltype model
(the celltype service's ``EMBEDDINGS`` output); each cell gets an attention weight (softmax
over the bag, so they sum to 1), the weighted mean of the cells' hidden vectors is
classified. The weights are the per-cell importance the report shows.

Lineage: the embeddings mean something only for the celltype model that produced them, so
the config pins it (`celltype: {"name": ..., "version": ...}`) and `embedding_dim` records
D; promotion refuses a MIL model whose pinned celltype version is not the one in serving
(`training.promote`). Standardisation statistics are persistent buffers (they travel in
`model.safetensors`), as for the ensemble.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from marrowscope.errors import InvalidInput


class GatedAttentionMIL(nn.Module):
    """`forward(bag FloatTensor[N, D])` -> (logit FloatTensor[], attention FloatTensor[N]
    summing to 1). Inputs are standardised with stored statistics (`fit_standardisation`)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, d_in: int, hidden: int = 64, attention: int = 32, dropout: float = 0.25):
        super().__init__()
        self.d_in, self.hidden, self.attention, self.dropout = d_in, hidden, attention, dropout
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        self.embed = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v = nn.Linear(hidden, attention)
        self.u = nn.Linear(hidden, attention)
        self.w = nn.Linear(attention, 1)
        self.classify = nn.Linear(hidden, 1)

    @torch.no_grad()
    def fit_standardisation(self, cells: np.ndarray) -> None:
        x = torch.as_tensor(np.asarray(cells), dtype=torch.float32)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((bag - self.mean) / self.std)
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1).softmax(0)
        return self.classify(a @ h).squeeze(-1), a

    @torch.inference_mode()
    def predict(self, bag: Any) -> tuple[float, np.ndarray]:
        """bag float[N, D] (N >= 1 cells, D = `d_in`, finite) -> (P(APL | AML), attention
        float32[N] summing to 1). Raises InvalidInput for any other shape or value."""
        x = np.asarray(bag)
        if x.dtype.kind != "f":
            raise InvalidInput(f"cell embeddings must be floating point, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InvalidInput(
                f"cell embeddings must be [N, {self.d_in}] (the MIL model's embedding_dim), "
                f"got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InvalidInput("a case needs at least one cell embedding")
        if not np.isfinite(x).all():
            raise InvalidInput("cell embeddings contain NaN or infinite values")
        device = self.mean.device
        logit, attention = self(torch.as_tensor(x, dtype=torch.float32, device=device))
        return float(torch.sigmoid(logit).item()), attention.float().cpu().numpy()


def build_mil(config: dict[str, Any]) -> GatedAttentionMIL:
    """The module of a validated `mil` config."""
    return GatedAttentionMIL(
        int(config["embedding_dim"]),
        hidden=int(config["hidden"]),
        attention=int(config["attention"]),
        dropout=float(config["dropout"]),
    )
