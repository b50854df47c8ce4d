"""Patient-grouped CV, nested CV, calibration and attention-MIL training for the APL
experiment (`training.apl`).

`repeated_grouped_cv` and `nested_folds` share one fold routine (`grouped_folds`), so every
model of the experiment is compared on identical outer folds: for each repeat a fresh
`StratifiedGroupKFold` (shuffled, seed + repeat), groups = patients, so no patient is ever
on both sides of a fold. Nested CV adds inner grouped folds over each outer-train set; a
`Candidate` makes every choice (epochs, dropout, C, temperature) on those only
(`nested_cv` checks that no inner fold holds an outer-test row). `summarise` turns
out-of-fold scores into the reported figures: AUROC with a patient-bootstrap CI, ECE,
Brier and saturation; `fit_platt` is the temperature (+ bias) scaling.

`GatedAttentionMIL` (`marrowscope.models.mil`, the served `mil` model kind) is the
gated-attention pooling of Ilse et al. (ICML 2018), the aggregation SCEMILA and DeepAPL use;
`train_mil` fits it on bags of cell embeddings with random instance sampling and instance
dropout (`sample_instances`), several bags per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from marrowscope.models.mil import (
    GatedAttentionMIL,
    MeanEmbeddingLogistic,
    MilFoldEnsemble,
    MilModel,
)

log = logging.getLogger(__name__)

FitPredict = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, rows: np.ndarray, *, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled group K-fold over `rows` (indices into y and groups): a list of
    (train, test) index arrays into the full arrays; no group is ever on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups[rows].tolist()))
    if folds < 2 or folds > n_groups:
        raise ValueError(f"cannot make {folds} folds from {n_groups} groups")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for tr, te in splitter.split(np.zeros(len(rows)), y[rows], groups[rows]):
        tr, te = rows[tr], rows[te]
        if set(groups[tr].tolist()) & set(groups[te].tolist()):
            raise AssertionError("a group is on both sides of a fold")
        out.append((tr, te))
    return out


def _inputs(y: np.ndarray, groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int)
    group_ids = np.asarray(groups)
    if len(y) != len(group_ids):
        raise ValueError(f"{len(y)} labels but {len(group_ids)} groups")
    return y, group_ids


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
    y, group_ids = _inputs(y, groups)
    out = np.full((repeats, len(y)), np.nan)
    for r in range(repeats):
        split = grouped_folds(y, group_ids, np.arange(len(y)), folds=folds, seed=seed + r)
        for f, (tr, te) in enumerate(split):
            out[r, te] = np.asarray(fit_predict(tr, te, r * folds + f), dtype=float)
    if np.isnan(out).any():
        raise ValueError("fit_predict left some out-of-fold scores unset (NaN)")
    return out


# ------------------------------------------------------------------ nested CV

Split = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class OuterFold:
    """One outer fold of the nested CV: `train`/`test` rows, and `inner` (train, validation)
    splits of the outer-train rows only, grouped the same way, for every choice a model
    makes (epochs, dropout, C, temperature)."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray
    inner: list[Split]


def nested_folds(
    y: np.ndarray,
    groups: Sequence[str],
    *,
    folds: int = 5,
    repeats: int = 5,
    inner_folds: int = 4,
    seed: int = 0,
) -> list[OuterFold]:
    """The outer folds of `repeated_grouped_cv` (same seeds, so the same patients are held
    out) with inner grouped folds over each outer-train set."""
    y, group_ids = _inputs(y, groups)
    out = []
    for r in range(repeats):
        split = grouped_folds(y, group_ids, np.arange(len(y)), folds=folds, seed=seed + r)
        for f, (tr, te) in enumerate(split):
            inner = grouped_folds(y, group_ids, tr, folds=inner_folds, seed=seed + 1000 + r)
            out.append(OuterFold(r, f, tr, te, inner))
    return out


class Fitted(Protocol):
    """A model fitted on one outer-train set; `predict(data, rows)` -> calibrated
    P(APL) float[len(rows)]; `choice` says what the inner folds chose."""

    choice: dict[str, Any]

    def predict(self, data: Any, rows: np.ndarray) -> np.ndarray: ...


class Candidate(Protocol):
    name: str

    def fit(self, data: Any, train: np.ndarray, inner: list[Split], seed: int) -> Fitted: ...


@dataclass
class NestedRun:
    """Out-of-fold calibrated probabilities float[repeats, N] and the fitted model of every
    outer fold (kept so the stability figure can score shifted cells of the same
    held-out patients with the same models)."""

    oof: np.ndarray
    fitted: list[tuple[OuterFold, Fitted]] = field(default_factory=list)

    def rescore(self, data: Any) -> np.ndarray:
        """Out-of-fold probabilities of `data` (e.g. the held-out patients' cells under a
        shift) from the same outer-fold models."""
        out = np.full_like(self.oof, np.nan)
        for fold, model in self.fitted:
            out[fold.repeat, fold.test] = model.predict(data, fold.test)
        return out


def nested_cv(data: Any, y: np.ndarray, candidate: Candidate, outer: list[OuterFold]) -> NestedRun:
    """Fit `candidate` on every outer fold's training rows (its choices on that fold's inner
    splits only) and score the held-out rows."""
    repeats = max(f.repeat for f in outer) + 1
    run = NestedRun(np.full((repeats, len(y)), np.nan))
    for i, fold in enumerate(outer):
        for inner_train, inner_val in fold.inner:
            if not set(inner_train) | set(inner_val) <= set(fold.train):
                raise AssertionError("an inner fold holds outer-test rows")
        model = candidate.fit(data, fold.train, fold.inner, i)
        run.oof[fold.repeat, fold.test] = model.predict(data, fold.test)
        run.fitted.append((fold, model))
        log.info("%s fold %d/%d: %s", candidate.name, i + 1, len(outer), model.choice)
    if np.isnan(run.oof).any():
        raise ValueError(f"{candidate.name} left some out-of-fold scores unset (NaN)")
    return run


# ------------------------------------------------------------------ calibration


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(temperature T > 0, bias b) minimising the log-loss of sigmoid(z / T + b) on
    out-of-fold logits z: temperature scaling with a bias, which also undoes a class
    weighting's prior shift. The targets are Platt's (1999) smoothed labels,
    (N+ + 1) / (N+ + 2) and 1 / (N- + 2) instead of 1 and 0: with a few dozen calibration
    patients no score should claim more certainty than they can show, which is what keeps
    held-out probabilities off 0 and 1. T is bounded to [0.05, 1000] (a logit that ranks
    the wrong way round gives a large T: a near-constant, prevalence-level probability)."""
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=float)
    labels = np.asarray(y).astype(int)
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    t = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(params: np.ndarray) -> float:
        a, b = np.exp(params[0]), params[1]
        s = z * a + b
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    best = minimize(
        loss,
        np.array([0.0, 0.0]),
        method="L-BFGS-B",
        bounds=[(np.log(1e-3), np.log(20.0)), (-20.0, 20.0)],
    )
    return float(1.0 / np.exp(best.x[0])), float(best.x[1])


def calibrated(logits: np.ndarray, temperature: float, bias: float) -> np.ndarray:
    return sigmoid(np.asarray(logits, dtype=float) / temperature + bias)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    t = np.asarray(y, dtype=float)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE: |mean P - observed rate| over `bins` equal-width probability bins, weighted by
    the share of cases in each."""
    p, t = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(p[which == b].mean() - t[which == b].mean()) * np.mean(which == b)
            for b in range(bins)
            if (which == b).any()
        )
    )


def calibration_summary(y: np.ndarray, oof: np.ndarray) -> dict[str, float]:
    """ECE and Brier (mean over repeats of each repeat's held-out probabilities) and
    saturation: the share of held-out scores outside [0.01, 0.99], their min and max."""
    from sklearn.metrics import brier_score_loss

    scores = np.asarray(oof, dtype=float)
    return {
        "ece": float(np.mean([expected_calibration_error(y, s) for s in scores])),
        "brier": float(np.mean([brier_score_loss(y, s) for s in scores])),
        "log_loss": float(np.mean([log_loss(y, s) for s in scores])),
        "saturated_share": float(np.mean((scores < 0.01) | (scores > 0.99))),
        "score_min": float(scores.min()),
        "score_max": float(scores.max()),
    }


def paired_auroc_difference(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same patients, with a stratified patient-bootstrap 95 %
    CI (both scores resampled together, so the patients' shared difficulty cancels)."""
    from scipy.stats import rankdata

    def auroc(t: np.ndarray, s: np.ndarray) -> float:
        # Mann-Whitney from ranks: ~100x cheaper than roc_auc_score in a bootstrap loop
        n_pos = int(t.sum())
        ranks = rankdata(s)
        return float((ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(t) - n_pos)))

    y = np.asarray(y).astype(int)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs[i] = auroc(y[idx], a[idx]) - auroc(y[idx], b[idx])
    return {
        "difference": auroc(y, a) - auroc(y, b),
        "ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
    }


def summarise(y: np.ndarray, oof: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUROC of each repeat's pooled out-of-fold scores (mean, SD over repeats), a
    stratified bootstrap 95 % CI (rows resampled) of the AUROC of the repeat-averaged
    scores, and `calibration_summary` (meaningful for probabilities)."""
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
        **calibration_summary(y, oof),
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
    """A `fit_predict` training one `GatedAttentionMIL` per fold (`train_mil`; all cells at
    test time); rows are patients, `bags[i]` float[n_i, D] their cells."""

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
        return sigmoid(mil_logits(model, [bags[i] for i in te]))

    return fit_predict


def sample_instances(
    n: int, rng: np.random.Generator, *, max_cells: int, instance_dropout: float
) -> np.ndarray:
    """Rows of one training view of an n-cell bag: each cell dropped with probability
    `instance_dropout` (at least one kept), then at most `max_cells` of the rest at random.
    A fresh view every step is the MIL model's augmentation: no patient is ever the same
    bag twice, so it cannot learn a patient by a few of its cells."""
    if not 0 <= instance_dropout < 1:
        raise ValueError(f"instance_dropout must be in [0, 1), got {instance_dropout}")
    kept = np.flatnonzero(rng.random(n) >= instance_dropout)
    if len(kept) == 0:
        kept = rng.choice(n, 1)
    if len(kept) > max_cells:
        kept = rng.choice(kept, max_cells, replace=False)
    return np.sort(kept)


def train_mil(
    bags: list[np.ndarray],
    y: np.ndarray,
    *,
    seed: int,
    epochs: int = 40,
    max_cells: int = 128,
    instance_dropout: float = 0.0,
    batch_bags: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    after_epoch: Callable[[int, GatedAttentionMIL], None] | None = None,
) -> GatedAttentionMIL:
    """A fitted `GatedAttentionMIL` (eval mode) on `bags` with labels y (0/1): Adam on
    class-weighted BCE, `batch_bags` bags per step (padded and masked), each a fresh
    `sample_instances` view. `after_epoch(epoch, model)` (1-based; model in eval mode
    meanwhile) lets a caller score validation bags and keep snapshots (early stopping)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GatedAttentionMIL(bags[0].shape[1])
    model.fit_standardisation(np.concatenate(bags))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    labels = torch.as_tensor(np.asarray(y, dtype=np.float32))
    n_pos = max(1.0, float(labels.sum()))
    pos_weight = torch.tensor((len(labels) - n_pos) / n_pos)
    tensors = [torch.as_tensor(b, dtype=torch.float32) for b in bags]
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in np.array_split(rng.permutation(len(bags)), -(-len(bags) // batch_bags)):
            views = [
                tensors[i][
                    sample_instances(
                        len(tensors[i]), rng, max_cells=max_cells, instance_dropout=instance_dropout
                    )
                ]
                for i in batch
            ]
            padded = nn.utils.rnn.pad_sequence(views, batch_first=True)
            lengths = torch.tensor([len(v) for v in views])
            mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
            logits, _ = model.forward_padded(padded, mask)
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits, labels[batch], pos_weight=pos_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if after_epoch is not None:
            model.eval()
            after_epoch(epoch, model)
    return model.eval()


def mil_logits(model: nn.Module, bags: Sequence[np.ndarray]) -> np.ndarray:
    """Logits float[len(bags)] of a MIL model (`GatedAttentionMIL` or `MilFoldEnsemble`)
    over every cell of each bag."""
    with torch.inference_mode():
        return np.array([float(model(torch.as_tensor(b, dtype=torch.float32))[0]) for b in bags])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float))))


def save_mil(
    model: MilModel,
    directory: Path | str,
    *,
    celltype: dict[str, str],
    training: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a registrable `mil` model (safetensors + config.json) whose config
    records D and the celltype model (`{"name", "version"}`) whose embeddings it learned:
    promotion refuses it beside another celltype version (`training.promote`)."""
    from marrowscope.models import make_config, save_model

    if isinstance(model, MeanEmbeddingLogistic):
        config = make_config(
            "mil",
            "mean_logistic",
            embedding_dim=model.d_in,
            calibration={"temperature": model.temperature, "bias": model.bias},
            celltype=dict(celltype),
            training=dict(training or {}),
        )
        return save_model(model, config, directory)
    config = make_config(
        "mil",
        "gated_attention",
        embedding_dim=model.d_in,
        hidden=model.hidden,
        attention=model.attention,
        dropout=model.dropout,
        **(
            {
                "members": len(model.members),
                "calibration": {"temperature": model.temperature, "bias": model.bias},
            }
            if isinstance(model, MilFoldEnsemble)
            else {}
        ),
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
