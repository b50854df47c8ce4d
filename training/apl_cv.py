"""Repeated patient-grouped CV and attention-MIL for the APL experiment (`training.apl`).

`repeated_grouped_cv` is the one CV routine every model of the experiment goes through, so
they are compared on identical folds: for each repeat a fresh `StratifiedGroupKFold`
(shuffled, seed + repeat) over the rows, groups = patients, so no patient is ever on both
sides of a fold. A model is a `fit_predict(train_rows, test_rows, fit_seed) -> scores`
callable. `summarise` turns the out-of-fold scores into the reported figures.

`GatedAttentionMIL` (`marrowscope.models.mil`, the served `mil` model kind) is the
gated-attention pooling of Ilse et al. (ICML 2018), the aggregation SCEMILA and DeepAPL use:
a patient's cells are embedded, each gets an attention weight (softmax over the bag) and the
weighted mean is classified. The weights are the per-cell importance a report shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marrowscope.models.mil import GatedAttentionMIL

log = logging.getLogger(__name__)

FitPredict = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def repeated_grouped_cv(
    y: np.ndarray,
    groups: Sequence[str],
    fit_predict: FitPredict,
    *,
    folds: int = 5,
    repeats: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold scores float[repeats, N]: row r holds every row's score from the fold
    model that did not see its group, in repeat r. y: 0/1 int[N] (stratification)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    group_ids = np.asarray(groups)
    if len(y) != len(group_ids):
        raise ValueError(f"{len(y)} labels but {len(group_ids)} groups")
    n_groups = len(set(group_ids.tolist()))
    if folds < 2 or folds > n_groups:
        raise ValueError(f"cannot make {folds} folds from {n_groups} groups")
    out = np.full((repeats, len(y)), np.nan)
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for f, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, group_ids)):
            if set(group_ids[tr].tolist()) & set(group_ids[te].tolist()):
                raise AssertionError("a group is on both sides of a fold")
            out[r, te] = np.asarray(fit_predict(tr, te, r * folds + f), dtype=float)
    if np.isnan(out).any():
        raise ValueError("fit_predict left some out-of-fold scores unset (NaN)")
    return out


def summarise(y: np.ndarray, oof: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUROC of each repeat's pooled out-of-fold scores (mean, SD over repeats) and a
    stratified bootstrap 95 % CI (rows resampled) of the AUROC of the repeat-averaged scores."""
    from sklearn.metrics import roc_auc_score

    from training.evaluate_metrics import bootstrap_ci

    per_repeat = [float(roc_auc_score(y, s)) for s in oof]
    mean_scores = oof.mean(axis=0)
    low, high = bootstrap_ci(y, mean_scores, roc_auc_score, n_boot=n_boot, seed=seed)
    return {
        "auroc_mean": float(np.mean(per_repeat)),
        "auroc_sd": float(np.std(per_repeat, ddof=1)) if len(per_repeat) > 1 else 0.0,
        "auroc_per_repeat": per_repeat,
        "auroc_of_mean_scores": float(roc_auc_score(y, mean_scores)),
        "auroc_ci95": [low, high],
        "n_boot": n_boot,
    }


# ------------------------------------------------------------------ attention MIL


def mil_fit_predict(
    bags: list[np.ndarray],
    y: np.ndarray,
    *,
    epochs: int = 40,
    max_cells: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
) -> FitPredict:
    """A `fit_predict` training one `GatedAttentionMIL` per fold (Adam, one bag per step,
    class-weighted BCE, at most `max_cells` random cells of a bag per step as augmentation;
    all cells at test time); rows are patients, `bags[i]` float[n_i, D] their cells."""

    def fit_predict(tr: np.ndarray, te: np.ndarray, fit_seed: int) -> np.ndarray:
        model = train_mil(
            [bags[i] for i in tr],
            y[tr],
            seed=fit_seed,
            epochs=epochs,
            max_cells=max_cells,
            lr=lr,
            weight_decay=weight_decay,
        )
        with torch.inference_mode():
            return np.array([torch.sigmoid(model(torch.as_tensor(bags[i]))[0]).item() for i in te])

    return fit_predict


def train_mil(
    bags: list[np.ndarray],
    y: np.ndarray,
    *,
    seed: int,
    epochs: int = 40,
    max_cells: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
) -> GatedAttentionMIL:
    """A fitted `GatedAttentionMIL` (eval mode) on `bags` with labels y (0/1)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GatedAttentionMIL(bags[0].shape[1])
    model.fit_standardisation(np.concatenate(bags))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    y = np.asarray(y, dtype=np.float32)
    n_pos = max(1.0, float(y.sum()))
    pos_weight = torch.tensor((len(y) - n_pos) / n_pos)
    tensors = [torch.as_tensor(b, dtype=torch.float32) for b in bags]
    model.train()
    for _ in range(epochs):
        for i in rng.permutation(len(bags)):
            bag = tensors[i]
            if len(bag) > max_cells:
                bag = bag[torch.as_tensor(rng.choice(len(bag), max_cells, replace=False))]
            logit, _ = model(bag)
            loss = nn.functional.binary_cross_entropy_with_logits(
                logit, torch.tensor(y[i]), pos_weight=pos_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def save_mil(
    model: GatedAttentionMIL,
    directory: Path | str,
    *,
    celltype: dict[str, str],
    training: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a registrable `mil` model (safetensors + config.json) whose config
    records D and the celltype model (`{"name", "version"}`) whose embeddings it learned:
    promotion refuses it beside another celltype version (`training.promote`)."""
    from marrowscope.models import make_config, save_model

    config = make_config(
        "mil",
        "gated_attention",
        embedding_dim=model.d_in,
        hidden=model.hidden,
        attention=model.attention,
        dropout=model.dropout,
        celltype=dict(celltype),
        training=dict(training or {}),
    )
    return save_model(model, config, directory)


def logistic_fit_predict(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> FitPredict:
    """A `fit_predict` of a standardised L2 logistic regression on rows of `x` (baselines)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit_predict(tr: np.ndarray, te: np.ndarray, fit_seed: int) -> np.ndarray:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        )
        model.fit(x[tr], y[tr])
        return model.predict_proba(x[te])[:, 1]

    return fit_predict
