"""Attention-based multiple-instance learning (MIL) over a case's cell embeddings: P(APL | AML).

Gated-attention pooling of Ilse et al. (ICML 2018), the aggregation SCEMILA and DeepAPL use:
every cell of a case (a "bag") is the penultimate embedding float[D] of the celltype model
(the celltype service's ``EMBEDDINGS`` output); each cell gets an attention weight (softmax
over the bag, so they sum to 1), the weighted mean of the cells' hidden vectors is
classified. The weights are the per-cell importance the report shows.

A served model may be a fold ensemble (`MilFoldEnsemble`, config `members` > 1 or a
`calibration`): K members trained on the inner folds of the training patients, their
logits averaged, then Platt/temperature-scaled (`calibration: {"temperature": T, "bias":
b}`, fitted on the members' out-of-fold logits) so that P(APL) is a calibrated
probability; its attention is the members' mean attention (still summing to 1).

Lineage: the embeddings mean something only for the celltype model that produced them, so
the config pins it (`celltype: {"name": ..., "version": ...}`) and `embedding_dim` records
D; promotion refuses a MIL model whose pinned celltype version is not the one in serving
(`training.promote`). Standardisation statistics are persistent buffers (they travel in
`model.safetensors`), as for the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        logits, attention = self.forward_padded(bag[None], None)
        return logits[0], attention[0]

    def forward_padded(
        self, bags: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """bags FloatTensor[B, M, D] (each bag padded to M cells), mask BoolTensor[B, M]
        (True: a real cell; None: all real) -> (logits FloatTensor[B], attention
        FloatTensor[B, M], 0 on padding, each row summing to 1). Training steps over
        several bags at once through this; `forward` is the one-bag case."""
        h = self.embed((bags - self.mean) / self.std)
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        a = scores.softmax(-1)
        pooled = torch.einsum("bm,bmh->bh", a, h)
        return self.classify(pooled).squeeze(-1), a

    @torch.inference_mode()
    def predict(self, bag: Any) -> tuple[float, np.ndarray]:
        """bag float[N, D] (N >= 1 cells, D = `d_in`, finite) -> (P(APL | AML), attention
        float32[N] summing to 1). Raises InvalidInput for any other shape or value."""
        return _predict(self, bag, self.d_in, self.mean.device)


class MilFoldEnsemble(nn.Module):
    """K `GatedAttentionMIL` members whose logits are averaged and then calibrated:
    `forward(bag FloatTensor[N, D])` -> (calibrated logit FloatTensor[] = mean member logit
    / temperature + bias, attention FloatTensor[N] = mean member attention, sum 1)."""

    def __init__(
        self, members: Sequence[GatedAttentionMIL], *, temperature: float = 1.0, bias: float = 0.0
    ):
        super().__init__()
        if not members:
            raise ValueError("a fold ensemble needs at least one member")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.d_in, self.hidden, self.attention, self.dropout = (
            first.d_in,
            first.hidden,
            first.attention,
            first.dropout,
        )
        self.temperature, self.bias = float(temperature), float(bias)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = zip(*(m(bag) for m in self.members), strict=True)
        logit = torch.stack(logits).mean(0) / self.temperature + self.bias
        return logit, torch.stack(attention).mean(0)

    @torch.inference_mode()
    def predict(self, bag: Any) -> tuple[float, np.ndarray]:
        """As `GatedAttentionMIL.predict`, with the ensemble's calibrated probability."""
        device = next(iter(self.members.buffers())).device
        return _predict(self, bag, self.d_in, device)


MilModel = GatedAttentionMIL | MilFoldEnsemble


def _predict(
    model: nn.Module, bag: Any, d_in: int, device: torch.device
) -> tuple[float, np.ndarray]:
    x = np.asarray(bag)
    if x.dtype.kind != "f":
        raise InvalidInput(f"cell embeddings must be floating point, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != d_in:
        raise InvalidInput(
            f"cell embeddings must be [N, {d_in}] (the MIL model's embedding_dim), "
            f"got {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InvalidInput("a case needs at least one cell embedding")
    if not np.isfinite(x).all():
        raise InvalidInput("cell embeddings contain NaN or infinite values")
    logit, attention = model(torch.as_tensor(x, dtype=torch.float32, device=device))
    return float(torch.sigmoid(logit).item()), attention.float().cpu().numpy()


def build_mil(config: dict[str, Any]) -> MilModel:
    """The module of a validated `mil` config: a `GatedAttentionMIL`, or a
    `MilFoldEnsemble` when the config has `members` > 1 or a `calibration`."""

    def member() -> GatedAttentionMIL:
        return GatedAttentionMIL(
            int(config["embedding_dim"]),
            hidden=int(config["hidden"]),
            attention=int(config["attention"]),
            dropout=float(config["dropout"]),
        )

    members = int(config.get("members", 1))
    calibration = config.get("calibration")
    if members == 1 and calibration is None:
        return member()
    calibration = calibration or {}
    return MilFoldEnsemble(
        [member() for _ in range(members)],
        temperature=float(calibration.get("temperature", 1.0)),
        bias=float(calibration.get("bias", 0.0)),
    )
