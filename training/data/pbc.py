"""PBC reader (Acevedo et al. 2020): 250 normal peripheral-blood cells per class for 11
classes from healthy donors (CellaVision DM96, Hospital Clinic Barcelona).

    from training.data.pbc import read_pbc
    records = read_pbc().records

`cells.csv` (cell_class, file); classes map to taxonomy codes by
`marrowscope.taxonomy.SOURCE_CLASS_MAP["pbc"]`. There are no patient ids (one image per
cell, donors unknown): records carry `patient_id=None` and `diagnosis="healthy"`, so a
patient-grouped split cannot hold them out; the cell typer keeps them in train/val
(`training.celltype`), or splits them by file where said.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from training.data.coco import DatasetFormatError
from training.data.singlecell import (
    DEFAULT_DATA_ROOT,
    CellRecord,
    ReadReport,
    keep_readable,
    require_root,
)

SOURCE = "pbc"
DEFAULT_ROOT = DEFAULT_DATA_ROOT / SOURCE


@dataclass(frozen=True)
class PBC:
    records: list[CellRecord]
    report: ReadReport


def read_pbc(root: str | Path = DEFAULT_ROOT, *, verify: bool = True, strict: bool = False) -> PBC:
    """Read the set under `root` (see `training.data.deepapl.read_deepapl` for `verify`,
    `strict` and the errors raised)."""
    root = require_root(Path(root), SOURCE, "cells.csv")
    report = ReadReport(SOURCE)
    with (root / "cells.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("cell_class", "file") if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetFormatError(f"{root / 'cells.csv'}: missing columns {missing}")
        listed = [
            CellRecord(
                source=SOURCE,
                patient_id=None,
                diagnosis="healthy",
                source_class=row["cell_class"],
                code=report.code(row["cell_class"], strict=strict),
                path=root / row["file"],
            )
            for row in reader
        ]
    records = keep_readable(listed, report, verify=verify)
    report.log()
    return PBC(records, report)
