"""Cell classes and attributes: the one source of truth for every other module.

Codes follow the bone-marrow cytomorphology dataset of Matek et al. (Blood 2021) so that
users who hold it can train on it directly. Red cells are detected but never counted in
the differential.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellType:
    code: str
    name: str
    lineage: str
    counted: bool
    """True when the cell is part of the differential count (all nucleated marrow cells)."""


@dataclass(frozen=True)
class Attribute:
    code: str
    name: str
    description: str


CELL_TYPES: tuple[CellType, ...] = (
    CellType("BLA", "blast (myeloblast)", "myeloid", True),
    CellType("PMO", "promyelocyte", "myeloid", True),
    CellType("MYB", "myelocyte", "myeloid", True),
    CellType("MMZ", "metamyelocyte", "myeloid", True),
    CellType("NGB", "band neutrophil", "myeloid", True),
    CellType("NGS", "segmented neutrophil", "myeloid", True),
    CellType("EOS", "eosinophil", "myeloid", True),
    CellType("BAS", "basophil", "myeloid", True),
    CellType("MON", "monocyte", "monocytic", True),
    CellType("LYT", "lymphocyte", "lymphoid", True),
    CellType("PLM", "plasma cell", "lymphoid", True),
    CellType("EBO", "erythroblast", "erythroid", True),
    CellType("RBC", "red blood cell", "erythroid", False),
)

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("auer_rod", "Auer rod", "needle-like azurophilic inclusion in blast cytoplasm"),
    Attribute("prominent_nucleoli", "prominent nucleoli", "one or more visible nucleoli"),
    Attribute(
        "cup_like_nucleus",
        "cup-like nucleus",
        "nuclear invagination with perinuclear clearing (typical of NPM1-mutated AML)",
    ),
    Attribute("condensed_chromatin", "condensed chromatin", "coarse, clumped chromatin"),
)

CODES: tuple[str, ...] = tuple(c.code for c in CELL_TYPES)
COUNTED_CODES: tuple[str, ...] = tuple(c.code for c in CELL_TYPES if c.counted)
ATTRIBUTE_CODES: tuple[str, ...] = tuple(a.code for a in ATTRIBUTES)
BLAST = "BLA"

NON_NUCLEATED_DETECTOR_LABELS = frozenset({"RBC", "Platelets"})
"""Detector labels (our `cell`/`RBC` detectors, BCCD's `WBC`/`RBC`/`Platelets`) that are
measured but never sent to the cell typer or counted."""

_BY_CODE = {c.code: c for c in CELL_TYPES}

# COCO category ids are 1-based positions in CELL_TYPES; 0 is background for detectors.
CATEGORY_IDS: dict[str, int] = {c.code: i + 1 for i, c in enumerate(CELL_TYPES)}
CODE_BY_CATEGORY_ID: dict[int, str] = {v: k for k, v in CATEGORY_IDS.items()}


class UnknownCellType(KeyError):
    """A cell-type code or category that is not in the taxonomy."""


def cell_type(code: str) -> CellType:
    """Look up a cell type by its code (case-insensitive)."""
    try:
        return _BY_CODE[code.upper()]
    except KeyError:
        raise UnknownCellType(f"unknown cell type {code!r}; known: {', '.join(CODES)}") from None


def coco_categories() -> list[dict]:
    """COCO `categories` entries for the taxonomy (id, name=code, supercategory=lineage)."""
    return [
        {
            "id": CATEGORY_IDS[c.code],
            "name": c.code,
            "supercategory": c.lineage,
            "full_name": c.name,
            "counted": c.counted,
        }
        for c in CELL_TYPES
    ]
