"""DeepAPL Discovery cohort reader: 81 AML patients (60 non-APL AML, 21 APL), about 13,000
signed-out peripheral-blood white cells (CellaVision crops).

    from training.data.deepapl import read_deepapl
    data = read_deepapl()                      # ../shared/data/deepapl
    data.patients["Patient_00"].diagnosis      # "APL"
    [r for r in data.records if r.code == "BLA"]

Layout (see the data README): `patients.csv` (patient_id, diagnosis, age, sex),
`cells.csv` (patient_id, cell_class, file relative to the set's folder). `cell_class` is
the hematopathologist's sign-out folder, mapped to a taxonomy code by
`marrowscope.taxonomy.SOURCE_CLASS_MAP["deepapl"]`; an empty class (not signed out) is kept
with `code=None`, so case-level work can use every cell of a patient while the cell typer
uses only the labelled ones. Unreadable images and class folders the taxonomy lacks (a
later cohort's) are logged and counted (`training.data.singlecell`), never fatal unless
`strict`.
"""

from __future__ import annotations

import csv
import logging
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

log = logging.getLogger(__name__)

SOURCE = "deepapl"
DEFAULT_ROOT = DEFAULT_DATA_ROOT / SOURCE
DIAGNOSES = ("AML", "APL")


@dataclass(frozen=True)
class Patient:
    patient_id: str
    diagnosis: str
    """`AML` (non-APL AML) or `APL`."""
    age: int | None
    sex: str | None
    n_cells: int
    """Readable cells of this patient (signed out or not); 0 for a listed patient without
    images."""


@dataclass(frozen=True)
class DeepAPL:
    patients: dict[str, Patient]
    records: list[CellRecord]
    report: ReadReport

    def labelled(self) -> list[CellRecord]:
        """Records with a taxonomy code (what the cell typer trains and tests on)."""
        return [r for r in self.records if r.code is not None]


def _rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetFormatError(f"{path}: missing columns {missing}")
        return list(reader)


def read_deepapl(
    root: str | Path = DEFAULT_ROOT, *, verify: bool = True, strict: bool = False
) -> DeepAPL:
    """Read the set under `root`. `verify` decodes every image once (about 10-20 s) so that
    truncated files are found here rather than in the middle of a training run.

    Raises `DataUnavailable` when `root` holds no cells.csv, `DatasetFormatError` for a
    malformed CSV, a cell whose patient is not in patients.csv or a diagnosis other than
    AML / APL, and, with `strict`, `UnknownCellType` for a class folder the taxonomy does
    not map (without it such cells are kept unlabelled and the folder is reported).
    """
    root = require_root(Path(root), SOURCE, "cells.csv")
    patients_rows = _rows(root / "patients.csv", ("patient_id", "diagnosis"))
    info: dict[str, dict[str, str]] = {}
    for row in patients_rows:
        if row["diagnosis"] not in DIAGNOSES:
            raise DatasetFormatError(
                f"{root / 'patients.csv'}: patient {row['patient_id']}: diagnosis "
                f"{row['diagnosis']!r} is not one of {DIAGNOSES}"
            )
        info[row["patient_id"]] = row
    report = ReadReport(SOURCE)
    listed = []
    for i, row in enumerate(_rows(root / "cells.csv", ("patient_id", "cell_class", "file"))):
        pid = row["patient_id"]
        if pid not in info:
            raise DatasetFormatError(
                f"{root / 'cells.csv'} row {i + 2}: patient {pid!r} is not in patients.csv"
            )
        listed.append(
            CellRecord(
                source=SOURCE,
                patient_id=pid,
                diagnosis=info[pid]["diagnosis"],
                source_class=row["cell_class"],
                code=report.code(row["cell_class"], strict=strict),
                path=root / row["file"],
            )
        )
    records = keep_readable(listed, report, verify=verify)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.patient] = counts.get(r.patient, 0) + 1
    patients = {
        pid: Patient(
            pid,
            row["diagnosis"],
            int(row["age"]) if row.get("age", "").strip().isdigit() else None,
            row.get("sex") or None,
            counts.get(pid, 0),
        )
        for pid, row in info.items()
    }
    empty = sorted(p for p, v in patients.items() if v.n_cells == 0)
    if empty:
        log.info("%s: %d listed patients have no readable cells: %s", SOURCE, len(empty), empty)
    report.log()
    return DeepAPL(patients, records, report)
