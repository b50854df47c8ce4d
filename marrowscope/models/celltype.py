"""Cell-type classifier: one backbone, one logistic head per cell type and per attribute.

Paper: Xception with transfer learning (timm `xception41` / `legacy_xception` here);
CPU-sized configs use torchvision `resnet18` or a tiny CNN. Output order is the config's
`outputs`: cell codes first, then attribute codes. A single `Linear(F, K)` is K
independent logistic heads sharing the backbone.

Loss choice (documented in `celltype_loss`): attributes always use binary cross-entropy
(they co-occur, e.g. a blast with Auer rods and nucleoli). Cell types use BCE on one-hot
targets with `cell_head="sigmoid"` (default; the paper trained per-type classifiers) or
softmax cross-entropy with `cell_head="softmax"` (types are mutually exclusive, and
probabilities then sum to one, which keeps the differential count calibrated).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marrowscope.errors import InvalidInput
from marrowscope.models.common import Normalize, images_to_tensor
from marrowscope.models.config import cell_outputs


def _tiny_cnn() -> tuple[nn.Module, int]:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    body = nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return body, 64


class _Residual(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 strided) shortcut, as ResNet's basic
    block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _cellnet(width: int = 32) -> tuple[nn.Module, int]:
    """A small ResNet for 64-128 px single-cell crops on a CPU: a strided stem and four
    stages of one basic block (width, 2w, 4w, 8w; 1.2 M parameters at w=32). ResNet18
    trains about 2x slower at 96 px here for no gain we could measure on these crops."""
    body = nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        _Residual(width, width, 1),
        _Residual(width, 2 * width, 2),
        _Residual(2 * width, 4 * width, 2),
        _Residual(4 * width, 8 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return body, 8 * width


STAIN_NORMS = ("none", "background", "instance")


def stain_normalise(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-image colour normalisation of x FloatTensor[B, 3, H, W] in [0, 1], inside the
    model so that serving and training always agree.

    `background`: each channel divided by its own 90th percentile, i.e. the glass (the
    brightest tenth of a cell image) becomes white: undoes a scanner's white balance and
    illumination. `instance`: each channel standardised to mean 0 / std 1 over the image:
    also removes stain intensity, at the cost of absolute colour. `none` returns x.
    """
    if mode == "none":
        return x
    flat = x.flatten(2)  # [B, 3, HW]
    if mode == "background":
        ref = torch.quantile(flat, 0.9, dim=2).clamp(min=0.05)  # [B, 3]
        return (x / ref[:, :, None, None]).clamp(0.0, 1.5)
    if mode == "instance":
        mean, std = flat.mean(dim=2), flat.std(dim=2).clamp(min=1e-3)
        return (x - mean[:, :, None, None]) / std[:, :, None, None] * 0.25 + 0.5
    raise InvalidInput(f"stain_norm must be one of {STAIN_NORMS}, got {mode!r}")


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """(feature extractor returning FloatTensor[B, F], F) for a celltype arch."""
    if arch == "tiny_cnn":
        return _tiny_cnn()
    if arch == "cellnet":
        return _cellnet()
    if arch == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        features = net.fc.in_features
        net.fc = nn.Identity()
        return net, features
    import timm

    net = timm.create_model(arch, pretrained=False, num_classes=0)
    return net, net.num_features  # type: ignore[return-value]  # timm: an int attribute


class CellTypeClassifier(nn.Module):
    """Multi-label cell classifier.

    `forward(x)`: x FloatTensor[B, 3, S, S] RGB in [0, 1] (S = `crop_size`; other sizes
    work but differ from training) -> logits FloatTensor[B, K], K = len(outputs).
    """

    logit_bias: torch.Tensor

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.outputs: list[str] = list(config["outputs"])
        cells, attrs = cell_outputs(config)
        self.n_cells, self.n_attributes = len(cells), len(attrs)
        self.cell_head = config["cell_head"]
        self.crop_size = config["crop_size"]
        self.stain_norm: str = config.get("stain_norm", "none")
        self.normalize = Normalize(config["mean"], config["std"])
        self.backbone, features = build_backbone(config["arch"])
        self.dropout = nn.Dropout(config.get("hyperparameters", {}).get("head_dropout", 0.0))
        self.head = nn.Linear(features, len(self.outputs))
        bias = config.get("logit_bias") or {}
        self.register_buffer(
            "logit_bias",
            torch.tensor([float(bias.get(code, 0.0)) for code in cells]),
            persistent=False,
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x FloatTensor[B, 3, S, S] RGB in [0, 1] -> the penultimate embedding
        FloatTensor[B, D] (after the in-model stain normalisation, before the head's dropout
        and linear layer): the one input path of `forward` and of every predictor."""
        return self.backbone(self.normalize(stain_normalise(x, self.stain_norm)))  # type: ignore[no-any-return]

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The embedding FloatTensor[B, D] (`embed`) -> logits FloatTensor[B, K]."""
        return self.head(self.dropout(h))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] -> probabilities [B, K] (cell part per `cell_head`, attributes sigmoid).

        The config's `logit_bias` (cell code -> added logit) is the operating point chosen
        after training (e.g. towards blasts, so that blast recall meets its target on
        held-out patients); it is applied here, so every caller gets the same decision."""
        cells = logits[:, : self.n_cells] + self.logit_bias.to(logits.dtype)
        cells = cells.softmax(dim=1) if self.cell_head == "softmax" else cells.sigmoid()
        return torch.cat([cells, logits[:, self.n_cells :].sigmoid()], dim=1)

    @torch.inference_mode()
    def predict_proba(self, crops: Any) -> torch.Tensor:
        """crops uint8[B, S, S, 3] or float[B, 3, S, S] in [0, 1] -> FloatTensor[B, K] on CPU.

        Column order is `self.outputs`. Call `eval()` first; this does not change modes.
        """
        device = next(self.parameters()).device
        x = images_to_tensor(crops, device)
        if x.shape[0] == 0:
            return torch.zeros((0, len(self.outputs)))
        return self.probabilities(self(x)).float().cpu()


CASE_NORM_PRIOR = 64
"""Weight of the training statistics in `case_batchnorm`, in cells: a case of n cells gets
n / (n + 64) of its own statistics (Schneider et al., NeurIPS 2020, "prior" N)."""


@contextmanager
def case_batchnorm(
    module: nn.Module, batches: Iterable[torch.Tensor], prior: float = CASE_NORM_PRIOR
) -> Iterator[nn.Module]:
    """Per-case test-time adaptation of the BatchNorm statistics: inside the block every
    BatchNorm layer of `module` normalises with the mean and variance of the case's own
    cells (`batches`: FloatTensor[B, 3, S, S] in [0, 1], all the case's crops), blended
    with the training statistics by n / (n + prior); on exit the training statistics are
    restored exactly. Weights are untouched.

    Why: a case holds hundreds of cells from one scanner and one stain batch, so its
    feature statistics say how that scanner and stain move every layer; re-centring each
    layer on them removes a shift that per-image colour normalisation does not reach."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.momentum, m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in norms
    ]
    was_training = module.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the case's batches
        module.eval()
        for m in norms:
            m.train()
        n = 0
        with torch.no_grad():
            for x in batches:
                module(x)
                n += int(x.shape[0])
        module.eval()
        w = n / (n + prior) if n else 0.0
        for m, (mean, var, _, _) in zip(norms, saved, strict=True):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.mul_(w).add_(mean, alpha=1 - w)
            m.running_var.mul_(w).add_(var, alpha=1 - w)
        yield module
    finally:
        for m, (mean, var, momentum, tracked) in zip(norms, saved, strict=True):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
        module.train(was_training)


def soft_label_matrix(
    codes: Sequence[str],
    *,
    smoothing: float = 0.0,
    pairs: Sequence[tuple[str, str, float]] = (),
) -> torch.Tensor | None:
    """FloatTensor[C, C] target distributions per true class, or None for plain one-hot.

    `smoothing`: uniform label smoothing (mass spread over all C classes). `pairs`: (a, b,
    e) moves mass e of a cell labelled a to b and of one labelled b to a, for a boundary
    whose labels disagree between observers (promyelocyte / blast: the same cell is signed
    out either way between patients); codes absent from `codes` are ignored."""
    n = len(codes)
    if not 0 <= smoothing < 1:
        raise InvalidInput(f"label smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0 and not any(e for _, _, e in pairs):
        return None
    m = torch.eye(n) * (1 - smoothing) + smoothing / n
    index = {c: i for i, c in enumerate(codes)}
    for a, b, e in pairs:
        if not 0 <= e < 0.5:
            raise InvalidInput(f"pair smoothing must be in [0, 0.5), got {e} for {a}/{b}")
        if a in index and b in index:
            i, j = index[a], index[b]
            for src, dst in ((i, j), (j, i)):
                moved = m[src, src] * e
                m[src, src] -= moved
                m[src, dst] += moved
    return m


def celltype_loss(
    logits: torch.Tensor,
    cell_targets: torch.Tensor,
    attribute_targets: torch.Tensor | None,
    *,
    cell_head: str,
    soft_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean training loss.

    logits FloatTensor[B, C + A]; cell_targets Int64Tensor[B] index into the cell codes of
    `outputs`; attribute_targets FloatTensor[B, A] of 0/1 (None when A == 0).
    Cell part: softmax CE (`cell_head="softmax"`) or BCE against one-hot (`"sigmoid"`);
    attribute part: BCE. The two parts are added with equal weight. `soft_targets`
    FloatTensor[C, C] (row i: the target distribution of a cell labelled i, rows summing
    to 1; `soft_label_matrix`) replaces the one-hot targets of the cell part.
    """
    n_attr = 0 if attribute_targets is None else attribute_targets.shape[1]
    n_cells = logits.shape[1] - n_attr
    if cell_targets.shape != (logits.shape[0],):
        raise InvalidInput(
            f"cell_targets must be [B]={logits.shape[0]}, got {tuple(cell_targets.shape)}"
        )
    if cell_targets.numel() and (cell_targets.min() < 0 or cell_targets.max() >= n_cells):
        raise InvalidInput(f"cell_targets must be in [0, {n_cells}), got {cell_targets.tolist()}")
    cell_logits = logits[:, :n_cells]
    if soft_targets is not None and soft_targets.shape != (n_cells, n_cells):
        raise InvalidInput(f"soft_targets must be [{n_cells}, {n_cells}], got {soft_targets.shape}")
    if cell_head == "softmax":
        if soft_targets is None:
            loss = F.cross_entropy(cell_logits, cell_targets)
        else:
            loss = F.cross_entropy(cell_logits, soft_targets[cell_targets].to(cell_logits.dtype))
    elif cell_head == "sigmoid":
        one_hot = F.one_hot(cell_targets, n_cells).to(cell_logits.dtype)
        if soft_targets is not None:
            one_hot = soft_targets[cell_targets].to(cell_logits.dtype)
        loss = F.binary_cross_entropy_with_logits(cell_logits, one_hot)
    else:
        raise InvalidInput(f"cell_head must be 'sigmoid' or 'softmax', got {cell_head!r}")
    if n_attr:
        loss = loss + F.binary_cross_entropy_with_logits(
            logits[:, n_cells:],
            attribute_targets.to(logits.dtype),  # type: ignore[union-attr]  # n_attr > 0
        )
    return loss
