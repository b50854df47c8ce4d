"""The case feature vector of the ensemble (the paper's "ENN" input) and the differential.

Built identically by ensemble training and by the gateway, so both call `case_features`.
Definitions (names in `case_feature_names()` order):

- A cell's *type* is the argmax of its probabilities over every taxonomy code (`CODES`,
  ties go to the first code in taxonomy order). A cell whose type is not counted (`RBC`,
  smudge cell `KSC`, platelet `PLT`, artefact `ART`, not identifiable `NIF`) is left out of
  every feature below and of the differential; `non_counted_summary` says how many of
  each there were (the report shows them next to the differential).
- `frac_<CODE>` for each of `COUNTED_CODES`: fraction of counted cells of that type
  (the fractions sum to 1 when at least one cell is counted).
- `frac_attr_<attr>` for each of `ATTRIBUTE_CODES`: mean attribute probability over the
  counted cells typed as blasts (`BLA`), 0 when there are none. Over blasts rather than all
  cells because the attributes (Auer rods, cup-like nuclei, nucleoli, condensed chromatin)
  characterise the blast population in AML / NPM1; over all cells they would mostly
  re-measure the blast fraction, which `frac_BLA` already carries.
- `mean_<f>` / `std_<f>` (population std) for each `f` of `MORPH_SUMMARY_FEATURES` over
  counted cells whose morphometrics succeeded (`segmentation_ok` = 1 when that key is
  present); 0 when there are none. Areas and lengths carry the units the segmentation
  service produced (um^2 / um when it knew the pixel size).
- `n_cells_log` = log1p(number of counted cells).

No cells at all gives the all-zero vector (the gateway abstains before asking the ensemble).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

from marrowscope.errors import InvalidInput
from marrowscope.taxonomy import ATTRIBUTE_CODES, BLAST, CODES, COUNTED_CODES, NON_COUNTED_CODES

MORPH_SUMMARY_FEATURES: tuple[str, ...] = (
    "cell_area",
    "nucleus_area",
    "nucleus_fraction",
    "nc_ratio",
    "cell_eccentricity",
    "nucleus_eccentricity",
    "nucleus_solidity",
    "cell_colour_range",
)
"""Morphometric features (names of `marrowscope.morphometrics.FEATURE_NAMES`) summarised
per case: size, N:C (both the bounded fraction and the ratio), shape, lobulation and the
colour range named by the paper."""

Z_95 = 1.959963984540054  # two-sided 95 % standard normal quantile


@dataclass(frozen=True)
class CellCall:
    """One classified cell: `probs` maps every code of `CODES` and `ATTRIBUTE_CODES` to a
    probability in [0, 1]; `morph` maps morphometric feature names to floats (must hold
    every `MORPH_SUMMARY_FEATURES` name)."""

    probs: Mapping[str, float]
    morph: Mapping[str, float]

    @property
    def cell_type(self) -> str:
        """Argmax code over the `CODES` present (may be a non-counted code such as `RBC`).

        Every counted code must be present (KeyError names the first missing one); the
        non-counted codes are optional, since a typer trained before they existed (or on
        nucleated cells only) never answers them."""
        for code in COUNTED_CODES:
            if code not in self.probs:
                raise KeyError(code)
        codes = [c for c in CODES if c in self.probs]
        return codes[int(np.argmax([self.probs[c] for c in codes]))]


class DifferentialEntry(NamedTuple):
    # shadows tuple.count(); the field name is the API (`entry.count`, gateway and tests)
    count: int  # type: ignore[assignment]
    fraction: float
    ci_low: float
    ci_high: float


@cache
def case_feature_names() -> tuple[str, ...]:
    """The fixed order of the case vector; changing it changes every trained ensemble."""
    return (
        *(f"frac_{c}" for c in COUNTED_CODES),
        *(f"frac_attr_{a}" for a in ATTRIBUTE_CODES),
        *(f"{s}_{f}" for f in MORPH_SUMMARY_FEATURES for s in ("mean", "std")),
        "n_cells_log",
    )


def _check(cell: CellCall, i: int) -> None:
    for key in (*COUNTED_CODES, *ATTRIBUTE_CODES):  # non-counted codes are optional
        p = cell.probs.get(key)
        if p is None:
            raise InvalidInput(f"cell {i}: probability for {key!r} is missing")
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise InvalidInput(f"cell {i}: probability for {key!r} is {p}, not in [0, 1]")
    for key in MORPH_SUMMARY_FEATURES:
        v = cell.morph.get(key)
        if v is None:
            raise InvalidInput(f"cell {i}: morphometric feature {key!r} is missing")
        if not math.isfinite(v):
            raise InvalidInput(f"cell {i}: morphometric feature {key!r} is {v}")


def _counted(cells: Sequence[CellCall]) -> list[tuple[str, CellCall]]:
    out = []
    for i, cell in enumerate(cells):
        _check(cell, i)
        code = cell.cell_type
        if code in COUNTED_CODES:
            out.append((code, cell))
    return out


def case_features(cells: Sequence[CellCall]) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, float32 [F]) for one case; see the module doc for every definition.

    Raises `InvalidInput` when a cell lacks a probability or summary feature, or holds a
    non-finite value or a probability outside [0, 1].
    """
    names = case_feature_names()
    counted = _counted(cells)
    vec = dict.fromkeys(names, 0.0)
    if counted:
        n = len(counted)
        for code in COUNTED_CODES:
            vec[f"frac_{code}"] = sum(c == code for c, _ in counted) / n
        blasts = [cell for c, cell in counted if c == BLAST]
        for attr in ATTRIBUTE_CODES:
            vec[f"frac_attr_{attr}"] = (
                float(np.mean([b.probs[attr] for b in blasts])) if blasts else 0.0
            )
        ok = [cell for _, cell in counted if cell.morph.get("segmentation_ok", 1.0) >= 0.5]
        if ok:
            table = np.array([[cell.morph[f] for f in MORPH_SUMMARY_FEATURES] for cell in ok])
            for f, mean, std in zip(
                MORPH_SUMMARY_FEATURES, table.mean(axis=0), table.std(axis=0), strict=True
            ):
                vec[f"mean_{f}"], vec[f"std_{f}"] = float(mean), float(std)
        vec["n_cells_log"] = math.log1p(n)
    return names, np.array([vec[k] for k in names], dtype=np.float32)


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n; (0, 1) when n is 0 (nothing is known)."""
    if n < 0 or not 0 <= k <= n:
        raise InvalidInput(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def differential(cells: Sequence[CellCall]) -> dict[str, DifferentialEntry]:
    """Differential count over counted cells: code -> (count, fraction, ci_low, ci_high)
    for every `COUNTED_CODES` code, in taxonomy order, with Wilson 95 % intervals.

    With no counted cells every entry is (0, 0.0, 0.0, 1.0).
    """
    return differential_of_codes([code for code, _ in _counted(cells)])


def differential_of_codes(codes: Sequence[str]) -> dict[str, DifferentialEntry]:
    """`differential` from the cells' type codes alone (the reviewer's labels, say): codes
    outside `COUNTED_CODES` (RBC, smudge cells, artefacts, ...) are left out of the count."""
    counted = [c for c in codes if c in COUNTED_CODES]
    n = len(counted)
    out = {}
    for code in COUNTED_CODES:
        k = sum(c == code for c in counted)
        low, high = wilson_interval(k, n)
        out[code] = DifferentialEntry(k, k / n if n else 0.0, low, high)
    return out


def non_counted_summary(cells: Sequence[CellCall]) -> dict[str, int]:
    """How many cells were typed as each non-counted code (`NON_COUNTED_CODES`, taxonomy
    order, every code present, 0 included): smudge cells, platelets, artefacts, cells not
    identifiable and red cells a detector sent to the typer. The differential leaves them
    out; a report shows these counts so a reader sees what was excluded and how much (many
    smudge cells, for instance, are a hint of a lymphoproliferative process or a fragile
    blast population). Validates the cells like `differential`."""
    out = dict.fromkeys(NON_COUNTED_CODES, 0)
    for i, cell in enumerate(cells):
        _check(cell, i)
        code = cell.cell_type
        if code in out:
            out[code] += 1
    return out
