"""Per-case domain check: how far a case's cells sit from the cells the served cell typer
was trained on (issue 23 §5).

The typer (and everything downstream: the differential, P(AML), P(NPM1), P(APL)) holds on
the patients and scanners it learned from and falls apart on others, so a case whose cells
look unlike the training cells should not get a case-level call.

Per cell, two distances (`cell_scores`, float32[N, 2]):
- `embedding`: the Mahalanobis distance of the typer's penultimate embedding, reduced by a
  PCA fitted on the training cells, under a shrunk (Ledoit-Wolf) covariance;
- `appearance`: the Mahalanobis distance of 7 colour and scale statistics of the crop
  (`appearance_features`: background colour, stain optical density, the cell's share of
  the crop), which move with the scanner's white balance, the stain batch and the pixel
  size even where the embedding is trained to ignore them; its covariance is widened by
  `APPEARANCE_TOLERANCE`, the shifts the typer is meant to tolerate.
Each is divided by sqrt(its dimension) and by its median over the training cells, so a
typical training cell scores 1 on both.

Per case (`case_score`): the median over its cells of each distance (robust to a few odd
cells: smudges, debris), and the case score is the larger of the two medians. Above the
reference's `threshold` (calibrated by `python -m training.domain` so that at most 5 % of
held-out in-domain patients exceed it) the case is out of domain.

A `DomainReference` is stored as JSON (`REFERENCE_FILE`, never a pickle) next to the
typer's weights, so it travels with the model version; `None` threshold = not calibrated.
Fitting it (PCA, Ledoit-Wolf) lives in `training.domain`; this module is numpy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.errors import InvalidInput

REFERENCE_FILE = "domain.json"
"""The reference's file name in a celltype model directory."""
FORMAT_VERSION = 1
COMPONENTS: tuple[str, str] = ("embedding", "appearance")
"""Columns of `cell_scores`, in order."""
APPEARANCE_FEATURES: tuple[str, ...] = (
    "background_r",
    "background_g",
    "background_b",
    "stain_od_r",
    "stain_od_g",
    "stain_od_b",
    "cell_fraction",
)
APPEARANCE_TOLERANCE: tuple[float, ...] = (20 / 255, 20 / 255, 20 / 255, 0.2, 0.2, 0.2, 0.1)
"""Standard deviations added to the training cells' appearance spread (`training.domain`
adds their squares to the covariance's diagonal): twice the background / stain colour
offsets of about 10 grey levels (0.1 optical density in a nucleus) and the cell-share
change of a pixel size 15 % off that `training.shifts` models as the next lab's analyser.
Why: one lab's CellaVision backgrounds barely vary, so without it a 10-level white-balance
difference, which the typer is trained to tolerate, would be many standard deviations."""
_TAIL = 0.2
"""Share of a crop's pixels read as background (brightest) and as stain (darkest)."""


class DomainReferenceError(InvalidInput):
    """A domain reference file that cannot be used (missing keys, wrong shapes, not finite)."""


@dataclass(frozen=True)
class DomainScore:
    """A case's domain score: `score` = max(`embedding`, `appearance`), each the median of
    its cells' distances (1 = a typical training cell)."""

    score: float
    embedding: float
    appearance: float
    n_cells: int


@dataclass(frozen=True)
class DomainReference:
    """What the typer was trained on, as per-cell feature statistics.

    pca_mean float64[D], pca_components float64[k, D]: embedding -> k-d projection;
    embedding_mean float64[k], embedding_precision float64[k, k]; appearance_mean
    float64[7], appearance_precision float64[7, 7] (inverse shrunk covariances);
    cell_scale float64[2]: the training cells' median raw distance per component."""

    pca_mean: np.ndarray
    pca_components: np.ndarray
    embedding_mean: np.ndarray
    embedding_precision: np.ndarray
    appearance_mean: np.ndarray
    appearance_precision: np.ndarray
    cell_scale: np.ndarray
    threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """Where it came from (typer config name, sources, cell counts) and the calibration."""

    def __post_init__(self) -> None:
        d, k = self.embedding_dim, self.pca_components.shape[0]
        m = len(APPEARANCE_FEATURES)
        want = {
            "pca_mean": (d,),
            "pca_components": (k, d),
            "embedding_mean": (k,),
            "embedding_precision": (k, k),
            "appearance_mean": (m,),
            "appearance_precision": (m, m),
            "cell_scale": (len(COMPONENTS),),
        }
        for name, shape in want.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = getattr(value, "shape", type(value).__name__)
                raise DomainReferenceError(f"domain reference {name} must be {shape}, got {got}")
            if not np.isfinite(value).all():
                raise DomainReferenceError(f"domain reference {name} has non-finite values")
        if k < 1 or d < 1 or (self.cell_scale <= 0).any():
            raise DomainReferenceError("domain reference has an empty projection or zero scale")
        if self.threshold is not None and not (
            math.isfinite(self.threshold) and self.threshold > 0
        ):
            raise DomainReferenceError(
                f"domain threshold must be a positive number, got {self.threshold}"
            )

    @property
    def embedding_dim(self) -> int:
        return int(self.pca_mean.shape[0]) if self.pca_mean.ndim == 1 else -1

    def cell_scores(self, embeddings: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """float32[N, 2] (`COMPONENTS`) for embeddings float[N, D] and their crops
        uint8[N, S, S, 3]."""
        emb = np.asarray(embeddings, np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise InvalidInput(
                f"embeddings must be [N, {self.embedding_dim}], got {list(emb.shape)}"
            )
        app = appearance_features(crops)
        if len(app) != len(emb):
            raise InvalidInput(f"{len(emb)} embeddings for {len(app)} crops")
        z = (emb - self.pca_mean) @ self.pca_components.T
        raw = np.stack(
            [
                _mahalanobis(z, self.embedding_mean, self.embedding_precision),
                _mahalanobis(app, self.appearance_mean, self.appearance_precision),
            ],
            axis=1,
        )
        scores: np.ndarray = (raw / self.cell_scale).astype(np.float32)
        return scores

    def out_of_domain(self, score: DomainScore) -> bool | None:
        """Whether `score` is above the threshold; None when not calibrated."""
        return None if self.threshold is None else score.score > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "components": list(COMPONENTS),
            "appearance_features": list(APPEARANCE_FEATURES),
            "aggregate": "max over components of the median over cells",
            "threshold": self.threshold,
            "pca_mean": self.pca_mean.tolist(),
            "pca_components": self.pca_components.tolist(),
            "embedding_mean": self.embedding_mean.tolist(),
            "embedding_precision": self.embedding_precision.tolist(),
            "appearance_mean": self.appearance_mean.tolist(),
            "appearance_precision": self.appearance_precision.tolist(),
            "cell_scale": self.cell_scale.tolist(),
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: Any) -> DomainReference:
        if not isinstance(data, dict):
            raise DomainReferenceError("a domain reference is a JSON object")
        if data.get("format") != FORMAT_VERSION:
            raise DomainReferenceError(
                f"domain reference format {data.get('format')!r} is not {FORMAT_VERSION}"
            )
        if data.get("appearance_features") != list(APPEARANCE_FEATURES):
            raise DomainReferenceError("domain reference was made with other appearance features")
        arrays = {}
        for name in (
            "pca_mean",
            "pca_components",
            "embedding_mean",
            "embedding_precision",
            "appearance_mean",
            "appearance_precision",
            "cell_scale",
        ):
            if name not in data:
                raise DomainReferenceError(f"domain reference lacks {name!r}")
            try:
                arrays[name] = np.asarray(data[name], dtype=np.float64)
            except (TypeError, ValueError):
                raise DomainReferenceError(f"domain reference {name} is not numeric") from None
        threshold = data.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float)
        ):
            raise DomainReferenceError(f"domain threshold must be a number, got {threshold!r}")
        info = data.get("info", {})
        return cls(
            **arrays,
            threshold=None if threshold is None else float(threshold),
            info=info if isinstance(info, dict) else {},
        )

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / REFERENCE_FILE
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> DomainReference | None:
        """The reference in `model_dir`, None when the directory has none; a file that is
        there but unusable raises DomainReferenceError (it must not silently disable the
        check)."""
        path = Path(model_dir) / REFERENCE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DomainReferenceError(f"{path}: not a readable JSON file ({exc})") from None
        try:
            return cls.from_json(data)
        except DomainReferenceError as exc:
            raise DomainReferenceError(f"{path}: {exc}") from None


def _mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """sqrt((x - mean)^T P (x - mean) / dim) per row: ~1 per row for in-distribution rows."""
    d = x - mean
    q = np.einsum("ij,jk,ik->i", d, precision, d)
    out: np.ndarray = np.sqrt(np.maximum(q, 0.0) / len(mean))
    return out


def appearance_features(crops: np.ndarray) -> np.ndarray:
    """float64[N, 7] (`APPEARANCE_FEATURES`) of crops uint8[N, S, S, 3].

    Background colour: the median RGB (in [0, 1]) of the brightest 20 % of the crop's
    pixels; stain: the mean optical density -ln((v + 1) / 256) per channel of the darkest
    20 % (the nucleus, mostly); cell fraction: the share of pixels darker than 80 % of the
    background brightness (with a whole-crop resize, a pixel-size change moves it)."""
    x = np.asarray(crops)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise InvalidInput(f"crops must be uint8[N, S, S, 3], got {x.dtype}{list(x.shape)}")
    n = x.shape[0]
    pixels = x.reshape(n, -1, 3).astype(np.float64)
    if pixels.shape[1] == 0:
        raise InvalidInput("crops must have at least one pixel")
    lum = pixels.mean(axis=2)
    order = np.argsort(lum, axis=1)
    tail = max(1, int(round(_TAIL * lum.shape[1])))
    rows = np.arange(n)[:, None]
    bright = pixels[rows, order[:, -tail:]]
    dark = pixels[rows, order[:, :tail]]
    background = np.median(bright, axis=1) / 255.0
    stain = (-np.log((dark + 1.0) / 256.0)).mean(axis=1)
    cell = (lum < 0.8 * background.mean(axis=1, keepdims=True) * 255.0).mean(axis=1)
    out: np.ndarray = np.concatenate([background, stain, cell[:, None]], axis=1)
    return out


def case_score(cell_scores: np.ndarray) -> DomainScore:
    """The case's `DomainScore` from its cells' `cell_scores` float[N, 2] (N >= 1)."""
    s = np.asarray(cell_scores, np.float64)
    if s.ndim != 2 or s.shape[1] != len(COMPONENTS) or not len(s):
        raise InvalidInput(f"cell domain scores must be [N >= 1, 2], got {list(s.shape)}")
    if not np.isfinite(s).all():
        raise InvalidInput("cell domain scores contain NaN or infinite values")
    emb, app = (float(v) for v in np.median(s, axis=0))
    return DomainScore(score=max(emb, app), embedding=emb, appearance=app, n_cells=len(s))
