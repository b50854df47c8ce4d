"""Classification metrics with bootstrap CIs, calibration, and their plots (scikit-learn).

Fixed metric names (documented in training/README.md):
binary (ensemble, npm1): `auroc`, `auroc_ci_low`, `auroc_ci_high`, `pr_auc`, `pr_auc_ci_low`,
`pr_auc_ci_high`, `brier`, `accuracy`, `sensitivity`, `specificity`, `n_pos`, `n_neg`;
cell types: `macro_f1`, `accuracy`, `f1_<code>`, `auroc_<attr>` (among the cell types that
show the attribute), `auroc_all_<attr>` (over all cells).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marrowscope.errors import InvalidInput

log = logging.getLogger(__name__)


def _binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise InvalidInput(
            f"y_true and y_score must be equal non-empty vectors, got {y.shape}, {s.shape}"
        )
    if not set(np.unique(y)) <= {0, 1}:
        raise InvalidInput("y_true must hold 0/1 labels")
    if not np.isfinite(s).all():
        raise InvalidInput("y_score contains NaN or infinite values")
    return y, s


def bootstrap_ci(
    y_true, y_score, metric, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of `metric(y, s)` over cases resampled with replacement,
    stratified by class (each resample keeps the class counts, so both are present)."""
    y, s = _binary_inputs(y_true, y_score)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        raise InvalidInput("bootstrap CI needs both classes")
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values[b] = metric(y[idx], s[idx])
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def binary_report(
    y_true, y_score, *, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The binary metrics (names above). Needs both classes in `y_true`."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        brier_score_loss,
        confusion_matrix,
        roc_auc_score,
    )

    y, s = _binary_inputs(y_true, y_score)
    if len(np.unique(y)) < 2:
        raise InvalidInput(f"AUROC needs both classes; got only {int(y[0])} ({len(y)} cases)")
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    out = {
        "auroc": float(roc_auc_score(y, s)),
        "pr_auc": float(average_precision_score(y, s)),
        "brier": float(brier_score_loss(y, np.clip(s, 0, 1))),
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": float(tp / max(tp + fn, 1)),
        "specificity": float(tn / max(tn + fp, 1)),
        "n_pos": float(y.sum()),
        "n_neg": float((1 - y).sum()),
        "threshold": float(threshold),
    }
    out["auroc_ci_low"], out["auroc_ci_high"] = bootstrap_ci(
        y, s, roc_auc_score, n_boot=n_boot, seed=seed
    )
    out["pr_auc_ci_low"], out["pr_auc_ci_high"] = bootstrap_ci(
        y, s, average_precision_score, n_boot=n_boot, seed=seed + 1
    )
    return out


def celltype_report(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    attr_true: dict[str, np.ndarray],
    attr_score: dict[str, np.ndarray],
) -> dict[str, float]:
    """`macro_f1` and `accuracy` over cell codes (classes present in `y_true`), `f1_<code>`,
    `auroc_<attr>` and `auroc_all_<attr>` for attributes with both labels present.

    `auroc_<attr>` is measured only among cells whose TRUE type shows the attribute at least
    once in `y_true` (e.g. cup-like nuclei: blasts). Over all cells a head that merely
    recognises blasts scores high (every positive is a blast), yet says nothing about which
    blast has a cup-like nucleus, and that is what the ensemble's NPM1 features need; a
    tiny CNN scored 0.97 over all cells and 0.33 (case level) among blasts. `auroc_all_<attr>`
    keeps the all-cells figure for comparison."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    labels = sorted(set(y_true))
    if not labels:
        raise InvalidInput("no cells to evaluate")
    f1s = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out = {
        "macro_f1": float(np.mean(f1s)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "n_cells": float(len(y_true)),
    }
    out.update({f"f1_{c}": float(v) for c, v in zip(labels, f1s, strict=True)})
    types = np.asarray(y_true)
    for attr, truth in attr_true.items():
        truth, score = np.asarray(truth).astype(int), np.asarray(attr_score[attr])
        if 0 < truth.sum() < len(truth):
            out[f"auroc_all_{attr}"] = float(roc_auc_score(truth, score))
        within = np.isin(types, sorted(set(types[truth == 1])))
        if 0 < truth[within].sum() < within.sum():
            out[f"auroc_{attr}"] = float(roc_auc_score(truth[within], score[within]))
    return out


def binary_plots(
    y_true, y_score, out_dir: Path, *, prefix: str = "", threshold: float = 0.5, title: str = ""
) -> list[Path]:
    """ROC, precision-recall, reliability curve and confusion matrix as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    y, s = _binary_inputs(y_true, y_score)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{prefix}{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(4, 4))
    RocCurveDisplay.from_predictions(y, s, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_title(f"ROC {title}")
    save(fig, "roc")
    fig, ax = plt.subplots(figsize=(4, 4))
    PrecisionRecallDisplay.from_predictions(y, s, ax=ax)
    ax.set_title(f"Precision-recall {title}")
    save(fig, "pr")
    fig, ax = plt.subplots(figsize=(4, 4))
    frac, mean = calibration_curve(y, np.clip(s, 0, 1), n_bins=min(10, max(2, len(y) // 5)))
    ax.plot(mean, frac, "o-", label="model")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.set_title(f"Reliability {title}")
    ax.legend()
    save(fig, "calibration")
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(
        y, (s >= threshold).astype(int), labels=[0, 1], ax=ax, colorbar=False
    )
    ax.set_title(f"Confusion at {threshold:g} {title}")
    save(fig, "confusion")
    return paths


def log_plots(paths: list[Path], artifact_path: str = "plots") -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    for p in paths:
        mlflow.log_artifact(str(p), artifact_path)
