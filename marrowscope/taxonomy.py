"""Cell classes and attributes: the one source of truth for every other module.

Codes follow the bone-marrow cytomorphology dataset of Matek et al. (Blood 2021) so that
users who hold it can train on it directly. Red cells are detected but never counted in
the differential.

Real smears also hold objects that must be recognised (so they are not mistaken for a
counted cell) but never counted: smudge cells (`KSC`, Matek's "Kernschatten"), platelets
including giant platelets and platelet aggregates (`PLT`), artefacts (`ART`) and cells
that cannot be identified (`NIF`). They come after `RBC` so the COCO category ids of the
older codes do not move, and they are not part of the case feature vector
(`COUNTED_CODES` is unchanged); `marrowscope.features.non_counted_summary` reports how
many of each a case had.

`SOURCE_CLASS_MAP` maps the folder names of the real single-cell sets (DeepAPL, PBC) to
codes; the table and the reason for every non-obvious choice are in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    CellType("KSC", "smudge cell", "other", False),
    CellType("PLT", "platelet (giant platelet, platelet aggregate)", "megakaryocytic", False),
    CellType("ART", "artefact", "other", False),
    CellType("NIF", "not identifiable", "other", False),
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
NON_COUNTED_CODES: tuple[str, ...] = tuple(c.code for c in CELL_TYPES if not c.counted)
BLAST = "BLA"

SOURCE_CLASS_MAP: dict[str, dict[str, str | None]] = {
    "deepapl": {
        "Blast, no lineage spec": "BLA",
        "Promyelocyte": "PMO",
        "Myelocyte": "MYB",
        "Metamyelocyte": "MMZ",
        "Band neutrophils": "NGB",
        "Segmented neutrophils": "NGS",
        "Eosinophils": "EOS",
        "Basophil": "BAS",
        "Monocyte": "MON",
        "Promonocyte": "BLA",
        "Lymphocyte": "LYT",
        "Lymphocyte, variant": "LYT",
        "Prolymphocyte": "LYT",
        "Plasma cells": "PLM",
        "Erythroblast": "EBO",
        "Smudge cells": "KSC",
        "Giant thrombocyte": "PLT",
        "Thrombocyte aggregation": "PLT",
        "Artifact": "ART",
        "Artifacts": "ART",
        "Artefact": "ART",
        "Artefacts": "ART",
        "Unidentified": "NIF",
        "Unidentifiable": "NIF",
        "Unidentified cells": "NIF",
        "Not identifiable": "NIF",
        "": None,
    },
    "pbc": {
        "basophil": "BAS",
        "eosinophil": "EOS",
        "erythroblast": "EBO",
        "promyelocyte": "PMO",
        "myelocyte": "MYB",
        "metamyelocyte": "MMZ",
        "band_neutrophil": "NGB",
        "segmented_neutrophil": "NGS",
        "lymphocyte": "LYT",
        "monocyte": "MON",
        "platelet": "PLT",
    },
}
"""Source folder name -> taxonomy code, per real data set (None: no class, not signed out).

Names are looked up case- and whitespace-insensitively (`source_code`: "ARTIFACT ",
"artifact" and "Artifact" are one folder; runs of blanks count as one), so a later cohort
that spells a folder differently from the discovery set still maps. A folder that is not
in the table is never guessed: `source_code` raises, and the readers count and report it
(`training.data.singlecell.ReadReport.unknown_classes`) or stop with `strict`.

Straight renames are not discussed; the choices that needed a decision:

- DeepAPL "Promonocyte" -> `BLA`: WHO 2016 / ICC 2022 count promonocytes as blast
  equivalents in AML, and the blast fraction is what the differential is read for; our
  taxonomy has no monoblast/promonocyte code and `MON` would hide them from the blast count.
- DeepAPL "Lymphocyte, variant" (reactive / atypical lymphocytes) and "Prolymphocyte"
  (one cell) -> `LYT`: both are mature-lineage lymphocytes in a peripheral-blood
  differential; the taxonomy has no atypical-lymphocyte code and the case feature vector
  must not change.
- DeepAPL "Band neutrophils" -> `NGB`, "Segmented neutrophils" -> `NGS`, "Eosinophils" ->
  `EOS`: Matek's codes for the same cells.
- DeepAPL "Smudge cells" -> `KSC`; "Giant thrombocyte" and "Thrombocyte aggregation" and
  PBC "platelet" -> `PLT`: recognised, never counted.
- DeepAPL "" (about 1,900 cells not signed out): no code. They keep their patient's
  diagnosis (useful for case-level work) but are never used to train or test the typer.
- DeepAPL "Artifact" / "Artifacts" / "Artefact" / "Artefacts" -> `ART`, "Unidentified" /
  "Unidentifiable" / "Unidentified cells" / "Not identifiable" -> `NIF`: the later DeepAPL
  cohort signs out artefacts and unidentified cells, which the discovery set in
  `../shared` lacks; the source's exact spelling is not known here, so the plausible
  American and British spellings, singular and plural, are all listed. Recognised, never
  counted.
- PBC "promyelocyte" / "myelocyte" / "metamyelocyte" (the source's immature granulocyte
  sub-classes) -> `PMO` / `MYB` / `MMZ`.
"""

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


def _folder_key(folder: str) -> str:
    return " ".join(folder.split()).casefold()


def _folder_index() -> dict[str, dict[str, str | None]]:
    index: dict[str, dict[str, str | None]] = {}
    for source, table in SOURCE_CLASS_MAP.items():
        keyed = index[source] = {}
        for folder, code in table.items():
            key = _folder_key(folder)
            # two spellings of one folder must not map to two codes
            if keyed.get(key, code) != code:
                raise ValueError(f"{source}: {folder!r} maps to {code} and {keyed[key]}")
            keyed[key] = code
    return index


_FOLDER_INDEX = _folder_index()


def source_code(source: str, folder: str) -> str | None:
    """Taxonomy code of a real data set's class folder (None: the cell has no class),
    looked up case- and whitespace-insensitively (see `SOURCE_CLASS_MAP`).

    Raises `UnknownCellType` naming the source and the folder when the table lacks it, so a
    new upstream class is a clear error (or, in the readers, a reported one) instead of a
    silently dropped cell."""
    try:
        table = SOURCE_CLASS_MAP[source]
    except KeyError:
        raise UnknownCellType(
            f"unknown source {source!r}; known: {', '.join(SOURCE_CLASS_MAP)}"
        ) from None
    try:
        return _FOLDER_INDEX[source][_folder_key(folder)]
    except KeyError:
        raise UnknownCellType(
            f"{source}: class folder {folder!r} has no taxonomy mapping "
            f"(marrowscope.taxonomy.SOURCE_CLASS_MAP); known: {', '.join(map(repr, table))}"
        ) from None


def coco_categories() -> list[dict[str, Any]]:
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
