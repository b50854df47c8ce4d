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

The other served form (config `arch: mean_logistic`, `MeanEmbeddingLogistic`) is the
simplest model that held up under the generalisation suite (issue 23 §3: nested-CV AUROC
not worse than MIL's, and within 0.05 under every controlled shift where MIL was not): a
standardised L2 logistic regression on the case's mean cell embedding, Platt/temperature
calibrated. Being linear, its case logit is exactly the mean of the cells' own logits; its
per-cell weight is each cell's own P(APL) as a one-cell case, normalised over the case
(sum 1), so the cells that look most APL-like rank first where the report sorts by
importance.

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


class MeanEmbeddingLogistic(nn.Module):
    """`forward(bag FloatTensor[N, D])` -> (calibrated logit FloatTensor[] =
    (w . (mean(bag) - mu) / sd + c) / temperature + bias, weights FloatTensor[N] summing to
    1: sigmoid of each cell's own calibrated logit, normalised over the bag).

    The weights come from a fitted scikit-learn `StandardScaler` + `LogisticRegression`
    (`from_sklearn`); mu, sd, w and c are persistent (they travel in `model.safetensors`),
    the calibration lives in the config as for the fold ensemble."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, d_in: int, *, temperature: float = 1.0, bias: float = 0.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.d_in = d_in
        self.temperature, self.bias = float(temperature), float(bias)
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        self.linear = nn.Linear(d_in, 1)

    @classmethod
    def from_sklearn(
        cls, pipeline: Any, *, temperature: float = 1.0, bias: float = 0.0
    ) -> MeanEmbeddingLogistic:
        """From a fitted `make_pipeline(StandardScaler(), LogisticRegression())` whose rows
        were mean cell embeddings; its `decision_function` is this module's uncalibrated
        logit."""
        scaler, logistic = pipeline[0], pipeline[-1]
        coef = np.asarray(logistic.coef_, dtype=np.float64)
        if coef.ndim != 2 or coef.shape[0] != 1:
            raise ValueError(f"need a binary logistic regression, got coef_ {list(coef.shape)}")
        model = cls(coef.shape[1], temperature=temperature, bias=bias)
        with torch.no_grad():
            model.mean.copy_(torch.as_tensor(scaler.mean_, dtype=torch.float32))
            scale = np.asarray(scaler.scale_, dtype=np.float64)
            model.std.copy_(torch.as_tensor(np.where(scale > 0, scale, 1.0), dtype=torch.float32))
            model.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
            model.linear.bias.copy_(torch.as_tensor(logistic.intercept_, dtype=torch.float32))
        return model

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # linear: the logit of the mean embedding is the mean of the cells' logits
        cell_logits = self.linear((bag - self.mean) / self.std).squeeze(-1)
        logit = cell_logits.mean() / self.temperature + self.bias
        apl_like = torch.sigmoid(cell_logits / self.temperature + self.bias)
        return logit, apl_like / apl_like.sum()

    @torch.inference_mode()
    def predict(self, bag: Any) -> tuple[float, np.ndarray]:
        """As `GatedAttentionMIL.predict`; the weights are the cells' normalised own P(APL)."""
        return _predict(self, bag, self.d_in, self.mean.device)


MilModel = GatedAttentionMIL | MilFoldEnsemble | MeanEmbeddingLogistic


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
    """The module of a validated `mil` config: `MeanEmbeddingLogistic` for arch
    `mean_logistic`; else a `GatedAttentionMIL`, or a `MilFoldEnsemble` when the config has
    `members` > 1 or a `calibration`."""
    if config["arch"] == "mean_logistic":
        calibration = config.get("calibration") or {}
        return MeanEmbeddingLogistic(
            int(config["embedding_dim"]),
            temperature=float(calibration.get("temperature", 1.0)),
            bias=float(calibration.get("bias", 0.0)),
        )

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
