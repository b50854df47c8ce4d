"""Real single-cell sets (DeepAPL, PBC): the record type, the read report, image checks and
the patient-grouped split shared by `training.data.deepapl` and `training.data.pbc`.

A record is one cell image with where it came from (`source`, `patient_id`, the patient's
`diagnosis`), the source's own class folder name (`source_class`) and its taxonomy code
(`code`, via `marrowscope.taxonomy.SOURCE_CLASS_MAP`; None for cells without a class).

Unreadable images (truncated JPEGs, missing files) are real: each gets one WARNING line
naming the file and the reason, is counted in `ReadReport`, and is left out of the
records; the summary line says how many. Nothing is dropped silently and nothing raises.

A class folder the taxonomy does not map (a later cohort's new sign-out class) does not
stop a read either: its cells are kept without a code (like cells not signed out, so
case-level work still sees them and the cell typer does not), and the folder's name and
cell count are in `ReadReport.unknown_classes`, the summary line, the active MLflow run
and the real-typer report. `strict=True` in the readers (`--strict` on the jobs) raises
`UnknownCellType` naming the folder instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marrowscope.paths import shared_data_dir
from marrowscope.taxonomy import UnknownCellType, source_code

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = shared_data_dir()
"""`../shared/data` next to the project root (env `MARROWSCOPE_SHARED_DATA` overrides)."""


class DataUnavailable(FileNotFoundError):
    """A real data set is not on this machine (tests skip on it, jobs stop with it)."""


@dataclass(frozen=True)
class CellRecord:
    source: str
    """`deepapl` or `pbc`."""
    patient_id: str | None
    """DeepAPL patient id; None for PBC (healthy donors, no ids)."""
    diagnosis: str | None
    """The patient's diagnosis (`AML` | `APL` for DeepAPL; `healthy` for PBC)."""
    source_class: str
    """The source's class folder name as written there ("" = not signed out)."""
    code: str | None
    """Taxonomy code of `source_class`; None when the cell has no class."""
    path: Path

    @property
    def patient(self) -> str:
        """`patient_id` of a record from a set that has patient ids (DeepAPL)."""
        if self.patient_id is None:
            raise ValueError(f"{self.path}: a {self.source} cell has no patient id")
        return self.patient_id


@dataclass
class ReadReport:
    source: str
    listed: int = 0
    kept: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """`path: reason` of each image that could not be decoded (e.g. truncated JPEG)."""
    unlabelled: int = 0
    """Records kept without a taxonomy code (DeepAPL cells not signed out, and cells of
    unknown class folders)."""
    unknown_classes: dict[str, int] = field(default_factory=dict)
    """Class folder name (as the source spells it) -> listed cells, for every folder the
    taxonomy does not map."""

    def summary(self) -> str:
        text = (
            f"{self.source}: {self.kept} of {self.listed} listed cells kept "
            f"({self.unlabelled} without a class), {len(self.missing)} missing files, "
            f"{len(self.unreadable)} unreadable images skipped"
        )
        if self.unknown_classes:
            folders = ", ".join(f"{k!r} ({n})" for k, n in sorted(self.unknown_classes.items()))
            text += f"; class folders without a taxonomy code, kept unlabelled: {folders}"
        return text

    def as_dict(self) -> dict[str, object]:
        """Counts and the unknown class folders (file lists are left to the log)."""
        return {
            "source": self.source,
            "listed": self.listed,
            "kept": self.kept,
            "unlabelled": self.unlabelled,
            "missing": len(self.missing),
            "unreadable": len(self.unreadable),
            "unknown_classes": dict(sorted(self.unknown_classes.items())),
        }

    def log(self) -> None:
        """The summary line (WARNING when anything was skipped or unknown), and, inside an
        active MLflow run, `import_<source>_unknown_cells` and `import/<source>.json`."""
        bad = self.missing or self.unreadable or self.unknown_classes
        log.log(logging.WARNING if bad else logging.INFO, "%s", self.summary())
        import sys

        # a job that tracks has imported mlflow already; a reader alone never pulls it in
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_metric(
                f"import_{self.source}_unknown_cells", sum(self.unknown_classes.values())
            )
            mlflow.log_dict(self.as_dict(), f"import/{self.source}.json")

    def code(self, folder: str, *, strict: bool) -> str | None:
        """`marrowscope.taxonomy.source_code` of `folder`; an unknown folder is counted here
        and gives None, or raises `UnknownCellType` (naming it) when `strict`."""
        try:
            return source_code(self.source, folder)
        except UnknownCellType:
            if strict:
                raise
            self.unknown_classes[folder] = self.unknown_classes.get(folder, 0) + 1
            return None


def import_markdown(reports: dict[str, dict[str, object]]) -> str:
    """A report section on what the importers read (`ReadReport.as_dict` per source)."""
    lines = ["## Import", "", "| source | listed | kept | unlabelled | unknown class folders |"]
    lines.append("|---|---|---|---|---|")
    for source, r in reports.items():
        unknown = r["unknown_classes"]
        assert isinstance(unknown, dict)
        folders = ", ".join(f"{k!r}: {n}" for k, n in unknown.items()) or "none"
        lines.append(f"| {source} | {r['listed']} | {r['kept']} | {r['unlabelled']} | {folders} |")
    return "\n".join(lines) + "\n"


def image_problem(path: Path) -> str | None:
    """None when `path` decodes as the services decode it, else the reason (never raises)."""
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import ImageLimits, decode_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    try:
        decode_image(data, limits=ImageLimits(min_side=1))
    except InvalidInput as exc:
        return str(exc)
    return None


def keep_readable(
    records: Iterable[CellRecord], report: ReadReport, *, verify: bool
) -> list[CellRecord]:
    """Records whose file exists (and decodes, with `verify`); each other one is logged on
    one line and counted in `report`."""
    out = []
    for r in records:
        report.listed += 1
        if not r.path.is_file():
            log.warning("%s: %s: file missing, skipped", report.source, r.path)
            report.missing.append(str(r.path))
            continue
        if verify:
            problem = image_problem(r.path)
            if problem is not None:
                log.warning(
                    "%s: %s: unreadable image (%s), skipped", report.source, r.path, problem
                )
                report.unreadable.append(f"{r.path}: {problem}")
                continue
        out.append(r)
        report.unlabelled += r.code is None
    report.kept = len(out)
    return out


def require_root(root: Path, name: str, marker: str) -> Path:
    root = Path(root)
    if not (root / marker).is_file():
        raise DataUnavailable(
            f"{root / marker} not found: the {name} set is not on this machine "
            f"(expected as ../shared/data/{name}, see that folder's README.md)"
        )
    return root


def split_patients(
    records: Sequence[CellRecord],
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> dict[str, str]:
    """patient_id -> `train` | `val` | `test`, grouped by patient (every cell of a patient on
    one side) and stratified by diagnosis, with `training.data.splits.split_cases` (the
    same splitter as the case-level jobs). Records without a patient id are ignored."""
    from training.data.manifest import CaseRecord
    from training.data.splits import split_cases

    diagnosis: dict[str, str] = {}
    for r in records:
        if r.patient_id is not None:
            diagnosis.setdefault(r.patient_id, r.diagnosis or "")
    if not diagnosis:
        raise ValueError("no records with a patient id to split")
    cases = [
        CaseRecord(case_id=p, patient_id=p, image_paths=(), aml_label=1, extra={"dx": d})
        for p, d in sorted(diagnosis.items())
    ]
    out = split_cases(
        cases,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        stratify=lambda c: c.extra["dx"],
    )
    return {c.patient_id: c.split for c in out}


def split_files(n: int, *, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Split labels (`train` / `val` / `test`) for n records without patient ids, at random
    by file (seeded)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    labels = np.full(n, "train", dtype=object)
    labels[order[:n_test]] = "test"
    labels[order[n_test : n_test + n_val]] = "val"
    return labels


def load_crops(
    records: Sequence[CellRecord],
    size: int,
    *,
    cache: Path | None = None,
    crop_mode: str = "image",
) -> tuple[np.ndarray, list[CellRecord]]:
    """(uint8[N, size, size, 3], the N records kept): every image decoded like the services
    decode and cut as the served single-cell path cuts it (`marrowscope.case.
    single_cell_crop`, `crop_mode`: resized whole by default, a single-cell image being
    already a crop around one cell). An image that does not decode is logged on one line,
    counted in the summary line and left out; nothing raises. With `cache`, the result is
    kept in `<cache>/crops-<sha>.npz` (keyed by the file list, size and mode) for the next
    run."""
    import hashlib

    from marrowscope.case import CROP_MODES, single_cell_crop
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import ImageLimits, decode_image

    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    key = hashlib.sha256(f"{size}\n".encode())
    if crop_mode != "image":  # the whole-image caches written before modes existed stay valid
        key.update(f"crop_mode={crop_mode}\n".encode())
    for p in sorted(str(r.path.resolve()) for r in records):  # same files, any order: one entry
        key.update(f"{p}\n".encode())
    cached = None if cache is None else Path(cache) / f"crops-{key.hexdigest()[:16]}.npz"
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            row = {p: i for i, p in enumerate(z["paths"].tolist())}
            kept = [r for r in records if str(r.path.resolve()) in row]
            crops = z["crops"][[row[str(r.path.resolve())] for r in kept]]
            log.info("%d crops from %s (%d unreadable before)", len(kept), cached, int(z["bad"]))
            return crops.reshape(-1, size, size, 3), kept
    crops, kept, bad = [], [], 0
    for r in records:
        try:
            image = decode_image(r.path.read_bytes(), limits=ImageLimits(min_side=1))
        except (InvalidInput, OSError) as exc:
            log.warning("%s: %s: unreadable image (%s), skipped", r.source, r.path, exc)
            bad += 1
            continue
        crops.append(single_cell_crop(image, size, crop_mode))
        kept.append(r)
    log.log(
        logging.WARNING if bad else logging.INFO,
        "decoded %d of %d cell images at %dx%d (%s), %d unreadable skipped",
        len(kept),
        len(records),
        size,
        size,
        crop_mode,
        bad,
    )
    out = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        paths = np.array([str(r.path.resolve()) for r in kept])
        # Written aside and renamed: two runs sharing a cache (splits trained side by side)
        # never read a half-written file.
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.npz")
        np.savez(tmp, crops=out, paths=paths, bad=bad)
        os.replace(tmp, cached)
    return out, kept
