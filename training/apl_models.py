"""The APL models compared by nested CV (`training.apl_cv.nested_cv`), each giving calibrated
P(APL | AML) for held-out patients, every choice made on the inner folds of its
outer-train patients only:

- `LogisticCandidate`: a standardised L2 logistic regression on one table per patient (the
  case vector, or the mean of a patient's cell embeddings), C chosen on the inner folds,
  then Platt/temperature scaling fitted on the inner out-of-fold logits at that C;
- `MilCandidate`: gated-attention MIL over the cell embeddings with random instance
  sampling and instance dropout; one model per inner fold, each scored on its inner
  validation patients every few epochs; the (instance dropout, epochs) pair with the best
  calibrated inner out-of-fold log-loss is kept (early stopping), the K inner-fold models
  at that epoch are the fold ensemble (logits averaged), and the temperature is fitted on
  their inner out-of-fold logits (`marrowscope.models.mil.MilFoldEnsemble`, what is saved
  and served);
- `combined_run`: the mean of several candidates' calibrated probabilities;
- `FixedCandidate`: a model with no choice to make (the product's ensemble net), scored as
  it is (uncalibrated: its probabilities are reported as they come).

`AplData` holds what they read per patient; a copy with the held-out patients' cells
under a shift gives the stability figure (`NestedRun.rescore`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from marrowscope.models.mil import GatedAttentionMIL, MilFoldEnsemble
from training.apl_cv import (
    NestedRun,
    Split,
    calibrated,
    fit_platt,
    log_loss,
    mil_logits,
    train_mil,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AplData:
    """Per patient (rows in one order): `y` 0/1 int[N], `bags[i]` float32[n_i, D] cell
    embeddings, `case` float[N, F] case vectors (`marrowscope.features`)."""

    y: np.ndarray
    bags: list[np.ndarray]
    case: np.ndarray
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    """other per-patient tables by name (e.g. the pathologists' differential)"""

    @cached_property
    def pooled(self) -> np.ndarray:
        """float[N, D]: each patient's mean cell embedding."""
        return np.stack([b.mean(0) for b in self.bags])

    def table(self, name: str) -> np.ndarray:
        if name == "case":
            return self.case
        if name == "pooled":
            return self.pooled
        return self.tables[name]


def _choose(scores: dict[Any, float]) -> Any:
    """The key with the lowest score; ties go to the earliest key (simplest first)."""
    return min(scores, key=lambda k: (round(scores[k], 6), list(scores).index(k)))


# ------------------------------------------------------------------ logistic


@dataclass
class _FittedLogistic:
    model: Any
    table: str
    temperature: float
    bias: float
    choice: dict[str, Any]

    def predict(self, data: AplData, rows: np.ndarray) -> np.ndarray:
        z = self.model.decision_function(data.table(self.table)[rows])
        return calibrated(z, self.temperature, self.bias)


@dataclass(frozen=True)
class LogisticCandidate:
    name: str
    table: str
    """`AplData.table` name: "case", "pooled" or one of `tables`"""
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    """regularisation grid, strongest first (ties go to the stronger)"""

    def _model(self, c: float) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    def fit(self, data: AplData, train: np.ndarray, inner: list[Split], seed: int) -> Any:
        x, y = data.table(self.table), data.y
        oof_logits: dict[float, np.ndarray] = {}
        scores: dict[float, float] = {}
        for c in self.cs:
            z = np.full(len(y), np.nan)
            for tr, va in inner:
                z[va] = self._model(c).fit(x[tr], y[tr]).decision_function(x[va])
            rows = np.concatenate([va for _, va in inner])
            oof_logits[c] = z[rows]
            t, b = fit_platt(z[rows], y[rows])
            scores[c] = log_loss(y[rows], calibrated(z[rows], t, b))
        c = _choose(scores)
        rows = np.concatenate([va for _, va in inner])
        t, b = fit_platt(oof_logits[c], y[rows])
        model = self._model(c).fit(x[train], y[train])
        return _FittedLogistic(model, self.table, t, b, {"C": c, "temperature": round(t, 3)})


# ------------------------------------------------------------------ MIL


@dataclass
class _FittedMil:
    model: MilFoldEnsemble
    choice: dict[str, Any]

    def predict(self, data: AplData, rows: np.ndarray) -> np.ndarray:
        from training.apl_cv import sigmoid

        return sigmoid(mil_logits(self.model, [data.bags[i] for i in rows]))


@dataclass(frozen=True)
class MilCandidate:
    name: str = "mil_fold_ensemble"
    instance_dropouts: tuple[float, ...] = (0.0, 0.5)
    max_epochs: int = 40
    every: int = 5
    """inner validation (and possible stopping point) every `every` epochs"""
    max_cells: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3

    def fit(self, data: AplData, train: np.ndarray, inner: list[Split], seed: int) -> Any:
        y = data.y
        rows = np.concatenate([va for _, va in inner])
        # (dropout, epoch) -> per inner fold: (validation logits, member snapshot)
        runs: dict[tuple[float, int], list[tuple[np.ndarray, GatedAttentionMIL]]] = {}
        for dropout in self.instance_dropouts:
            for k, (tr, va) in enumerate(inner):
                val_bags = [data.bags[i] for i in va]

                def keep(
                    epoch: int,
                    model: GatedAttentionMIL,
                    d: float = dropout,
                    val: list[np.ndarray] = val_bags,
                ) -> None:
                    if epoch % self.every == 0 or epoch == self.max_epochs:
                        runs.setdefault((d, epoch), []).append(
                            (mil_logits(model, val), copy.deepcopy(model))
                        )

                train_mil(
                    [data.bags[i] for i in tr],
                    y[tr],
                    seed=seed * 100 + k,
                    epochs=self.max_epochs,
                    max_cells=self.max_cells,
                    instance_dropout=dropout,
                    lr=self.lr,
                    weight_decay=self.weight_decay,
                    after_epoch=keep,
                )
        scores: dict[tuple[float, int], float] = {}
        platt: dict[tuple[float, int], tuple[float, float]] = {}
        for key, per_fold in runs.items():
            z = np.concatenate([logits for logits, _ in per_fold])
            platt[key] = fit_platt(z, y[rows])
            scores[key] = log_loss(y[rows], calibrated(z, *platt[key]))
        # earliest epoch first among equals: the shorter training is the simpler model
        ordered = dict(sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0])))
        dropout, epochs = _choose(ordered)
        t, b = platt[(dropout, epochs)]
        members = [m for _, m in runs[(dropout, epochs)]]
        model = MilFoldEnsemble(members, temperature=t, bias=b).eval()
        choice = {
            "instance_dropout": dropout,
            "epochs": epochs,
            "members": len(members),
            "temperature": round(t, 3),
        }
        return _FittedMil(model, choice)


# ------------------------------------------------------------------ combinations


@dataclass
class _FittedAverage:
    parts: list[Any]
    choice: dict[str, Any]

    def predict(self, data: AplData, rows: np.ndarray) -> np.ndarray:
        return np.asarray(np.mean([p.predict(data, rows) for p in self.parts], axis=0))


def combined_run(parts: Sequence[NestedRun]) -> NestedRun:
    """The average of the parts' calibrated probabilities, fold by fold: the parts were fitted
    on the same outer folds (`nested_folds`), so no refitting is needed, and a rescore
    under a shift rescores every part."""
    first = parts[0]
    run = NestedRun(np.mean([p.oof for p in parts], axis=0))
    for i, (fold, _) in enumerate(first.fitted):
        fitted = [p.fitted[i][1] for p in parts]
        if any(p.fitted[i][0] is not fold for p in parts):
            raise ValueError("combined runs must come from the same outer folds")
        run.fitted.append((fold, _FittedAverage(fitted, {"parts": len(fitted)})))
    return run


@dataclass
class _FittedFixed:
    predict_rows: Callable[[AplData, np.ndarray], np.ndarray]
    choice: dict[str, Any]

    def predict(self, data: AplData, rows: np.ndarray) -> np.ndarray:
        return self.predict_rows(data, rows)


@dataclass(frozen=True)
class FixedCandidate:
    """A model with no choice to make: `train(data, train_rows, seed)` returns a
    `predict(data, rows) -> P` callable."""

    name: str
    train: Callable[[AplData, np.ndarray, int], Callable[[AplData, np.ndarray], np.ndarray]]

    def fit(self, data: AplData, train: np.ndarray, inner: list[Split], seed: int) -> Any:
        return _FittedFixed(self.train(data, train, seed), {})
