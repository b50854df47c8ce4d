"""Case manifest: one CSV row per case, the unit of every split.

Columns: case_id, patient_id, image_paths (';'-separated, relative to the manifest's
folder), aml_label (0/1), npm1_status (mutated | wild_type | na), vaf (float or empty),
blast_pct (float or empty), split (train | val | test | empty).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

COLUMNS = (
    "case_id",
    "patient_id",
    "image_paths",
    "aml_label",
    "npm1_status",
    "vaf",
    "blast_pct",
    "split",
)
NPM1_STATUSES = ("mutated", "wild_type", "na")
SPLITS = ("train", "val", "test", "")


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file, row and column."""


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    patient_id: str
    image_paths: tuple[str, ...]
    aml_label: int
    npm1_status: str = "na"
    vaf: float | None = None
    blast_pct: float | None = None
    split: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def npm1_label(self) -> int | None:
        """1 for mutated, 0 for wild type, None when not applicable (controls)."""
        return {"mutated": 1, "wild_type": 0}.get(self.npm1_status)

    def with_split(self, split: str) -> CaseRecord:
        return replace(self, split=split)


def _opt_float(value: str, where: str) -> float | None:
    if value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise ManifestError(f"{where}: not a number: {value!r}") from None


def read_manifest(path: str | Path, *, check_images: bool = False) -> list[CaseRecord]:
    """Read a case manifest. With `check_images`, every image path must exist."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    records: list[CaseRecord] = []
    seen: set[str] = set()
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing}")
        for lineno, row in enumerate(reader, start=2):
            where = f"{path}:{lineno}"
            case_id = row["case_id"].strip()
            if not case_id:
                raise ManifestError(f"{where}: empty case_id")
            if case_id in seen:
                raise ManifestError(f"{where}: duplicate case_id {case_id!r}")
            seen.add(case_id)
            if row["aml_label"].strip() not in ("0", "1"):
                raise ManifestError(f"{where}: aml_label must be 0 or 1, got {row['aml_label']!r}")
            npm1 = row["npm1_status"].strip() or "na"
            if npm1 not in NPM1_STATUSES:
                raise ManifestError(f"{where}: npm1_status must be one of {NPM1_STATUSES}")
            split = row["split"].strip()
            if split not in SPLITS:
                raise ManifestError(f"{where}: split must be one of {SPLITS[:-1]} or empty")
            images = tuple(p for p in row["image_paths"].split(";") if p.strip())
            if not images:
                raise ManifestError(f"{where}: case {case_id!r} has no images")
            if check_images:
                for p in images:
                    if not (path.parent / p).is_file():
                        raise ManifestError(f"{where}: image not found: {p}")
            records.append(
                CaseRecord(
                    case_id=case_id,
                    patient_id=row["patient_id"].strip() or case_id,
                    image_paths=images,
                    aml_label=int(row["aml_label"]),
                    npm1_status=npm1,
                    vaf=_opt_float(row["vaf"], f"{where} vaf"),
                    blast_pct=_opt_float(row["blast_pct"], f"{where} blast_pct"),
                    split=split,
                    extra={k: v for k, v in row.items() if k not in COLUMNS and k is not None},
                )
            )
    return records


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_manifest(path: str | Path, records: Iterable[CaseRecord]) -> Path:
    """Write records as a manifest CSV (stable column order, '\\n' line ends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow(
                [
                    r.case_id,
                    r.patient_id,
                    ";".join(r.image_paths),
                    r.aml_label,
                    r.npm1_status,
                    _fmt(r.vaf),
                    _fmt(r.blast_pct),
                    r.split,
                ]
            )
    return path
