"""The APL stability figure (issue 23 §1/§3): the nested-CV models of `training.apl`, each
outer fold's fitted model unchanged, score their held-out patients again with those
patients' cells under one deterministic shift of `training.shifts` (stain, background,
contrast, focus, compression, pixel size).

Cost bound: one typer pass per shift over a fixed subset of cells, up to `per_patient`
of the cells whose morphometrics were measured (`training.apl.measure_sample`), for every
patient. The unshifted reference is the same subset as recorded (its cached typing and
morphometrics), so a drop is the shift's doing, not the smaller bag's. Each shifted cell is
decoded from its file, shifted at its recorded resolution (a blur or scale shift acts on
the pixels as scanned), then resized for the typer and for morphometrics, as unshifted
cells were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.engine import progress

log = logging.getLogger(__name__)

DEFAULT_SHIFTS: tuple[str, ...] = ("stain_blue", "bg_warm", "contrast_low", "blur", "scale_down")
"""one shift per photometric / optical / scale family (the full list costs a typer pass each)"""


@dataclass(frozen=True)
class CellArrays:
    """Per cell of the cohort (`AplCohort.cells` order): typer probabilities float[N, K],
    embeddings float[N, D], morphometrics float[N, M], `keep` bool[N] (cells in use)."""

    probs: np.ndarray
    embeds: np.ndarray
    morph: np.ndarray
    keep: np.ndarray

    def restricted(self, rows: np.ndarray) -> CellArrays:
        keep = np.zeros_like(self.keep)
        keep[rows] = True
        return CellArrays(self.probs, self.embeds, self.morph, keep & self.keep)

    def replaced(
        self, rows: np.ndarray, probs: np.ndarray, embeds: np.ndarray, morph: np.ndarray
    ) -> CellArrays:
        """These arrays with `rows` re-typed and re-measured, only `rows` in use."""
        p, e, m = self.probs.copy(), self.embeds.copy(), self.morph.copy()
        p[rows], e[rows], m[rows] = probs, embeds, morph
        return CellArrays(p, e, m, self.keep).restricted(rows)


def subset_rows(
    patients: list[str], keep: np.ndarray, morph: np.ndarray, per_patient: int
) -> np.ndarray:
    """Up to `per_patient` in-use cells per patient (`patients[i]`: cell i's patient), those
    with measured morphometrics first, in cohort order (fixed across runs); every patient
    with a cell in use keeps at least one."""
    measured = np.abs(morph).sum(1) > 0
    order = sorted(np.flatnonzero(keep), key=lambda i: (not measured[i], i))
    chosen: dict[str, list[int]] = {}
    for i in order:
        rows = chosen.setdefault(patients[i], [])
        if len(rows) < per_patient:
            rows.append(int(i))
    return np.array(sorted(r for rows in chosen.values() for r in rows), dtype=int)


def shifted_cells(
    files: list[Any], rows: np.ndarray, shift: str, size: int, crop_mode: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """(crops uint8[n, size, size, 3], half uint8[n, 91, 90, 3]) of the cells `files[rows]`
    under `shift`, cut as `training.apl.load_cells` cuts unshifted cells."""
    from marrowscope.case import single_cell_crop
    from marrowscope.imaging import decode_image, resize_for_model
    from training.shifts import apply_shift

    crops = np.zeros((len(rows), size, size, 3), np.uint8)
    half = np.zeros((len(rows), 91, 90, 3), np.uint8)
    for j, i in enumerate(progress(rows, desc=f"shift {shift}")):
        image = apply_shift(decode_image(files[i].read_bytes()), shift)
        crops[j] = single_cell_crop(image, size, crop_mode)
        half[j] = resize_for_model(image, (91, 90))
    return crops, half


def measure(half: np.ndarray) -> np.ndarray:
    from marrowscope.morphometrics import measure_cell

    return np.stack([measure_cell(h).as_vector() for h in half]).astype(np.float32)


def stability_table(
    y: np.ndarray, reference: dict[str, np.ndarray], shifted: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Per model: AUROC (mean over repeats) of the unshifted subset, under each shift, the
    drop per shift (reference - shifted) and the worst drop; `within_0_05`: every
    |drop| <= 0.05 (the issue's bar)."""
    from sklearn.metrics import roc_auc_score

    def auroc(oof: np.ndarray) -> float:
        return float(np.mean([roc_auc_score(y, s) for s in oof]))

    out: dict[str, Any] = {}
    for name, ref in reference.items():
        base = auroc(ref)
        per_shift = {s: auroc(scores[name]) for s, scores in shifted.items()}
        drops = {s: round(base - a, 4) for s, a in per_shift.items()}
        worst = max(drops.values(), key=abs) if drops else 0.0
        out[name] = {
            "auroc_unshifted_subset": round(base, 4),
            "auroc_by_shift": {s: round(a, 4) for s, a in per_shift.items()},
            "drop_by_shift": drops,
            "worst_drop": worst,
            "within_0_05": bool(all(abs(d) <= 0.05 for d in drops.values())),
        }
    return out
