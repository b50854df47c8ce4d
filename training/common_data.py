"""Dataset access shared by the training jobs: case splits, detection sets, image reading,
the data hash recorded with every model version.

Splits are made once per dataset with a fixed `split_seed` (config `common.split_seed`),
grouped by patient and stratified by control / NPM1-mutated / wild-type AML, so every job
(segmentation, celltype, ensemble, npm1) sees the same held-out test cases. A manifest
whose `split` column is filled is used as it is.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.cli import UsageError

log = logging.getLogger(__name__)

SYNTH_DETECTOR_CLASSES = ("cell", "RBC")
"""Detector classes on taxonomy data: the paper's Faster R-CNN finds cells, the celltype
model types them; red cells are a class of their own so they are never typed or counted."""


def trained_on(data_dir: Path | None) -> str:
    """`training.trained_on` (`marrowscope.provenance`) of a model trained on `data_dir`:
    a real set of `../shared/data` by its folder name (`bccd`, `wbc-seg`, `deepapl`,
    `pbc`), `synthetic` for a cohort of `training.data.synth` (its COCO `info.generator`)
    or no folder at all, else `unknown` (another lab's data: real, but not one we know).
    Jobs that mix sources record them themselves (celltype, nucseg)."""
    import json

    from marrowscope.provenance import REAL_SETS, SYNTHETIC, UNKNOWN
    from training.data.synth import GENERATOR

    if data_dir is None:
        return SYNTHETIC
    data_dir = Path(data_dir)
    if data_dir.name in REAL_SETS:
        return data_dir.name
    coco = data_dir / "annotations.json"
    if coco.is_file():
        try:
            info = json.loads(coco.read_text()).get("info") or {}
        except (OSError, ValueError):
            return UNKNOWN
        return SYNTHETIC if info.get("generator") == GENERATOR else UNKNOWN
    return UNKNOWN


def is_voc(data_dir: Path) -> bool:
    return (Path(data_dir) / "Annotations").is_dir() and not (
        Path(data_dir) / "annotations.json"
    ).is_file()


def data_hash(data_dir: Path) -> str:
    """sha256 over the files that define a dataset's labels and splits (annotations.json and
    cases.csv, or a VOC folder's XML files and split lists, or an ImageFolder's file list)."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    files = [data_dir / n for n in ("annotations.json", "cases.csv") if (data_dir / n).is_file()]
    if not files and (data_dir / "Annotations").is_dir():
        files = sorted((data_dir / "Annotations").glob("*.xml")) + sorted(
            (data_dir / "ImageSets" / "Main").glob("*.txt")
        )
    if files:
        for f in files:
            h.update(str(f.relative_to(data_dir)).encode() + b"\0")
            h.update(f.read_bytes())
    else:  # single-cell ImageFolder: names and sizes (hashing every pixel is not needed)
        for f in sorted(p for p in data_dir.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(data_dir)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def load_cases(data_dir: Path, config) -> list:
    """Case records with `split` set (train / val / test)."""
    from training.data.manifest import read_manifest
    from training.data.splits import split_cases

    path = Path(data_dir) / "cases.csv"
    if not path.is_file():
        raise UsageError(f"{data_dir} has no cases.csv (case manifest); case-level jobs need one")
    records = read_manifest(path)
    if all(r.split for r in records):
        return records
    return split_cases(
        records,
        test_fraction=config["test_fraction"],
        val_fraction=config["val_fraction"],
        seed=config["split_seed"],
        stratify="aml_npm1",
    )


def read_rgb(path: Path) -> np.ndarray:
    """uint8[H, W, 3] RGB of an image file (same decoder as the services)."""
    from marrowscope.imaging import ImageLimits, decode_image

    return decode_image(Path(path).read_bytes(), limits=ImageLimits(min_side=1))


@dataclass(frozen=True)
class DetectionItem:
    path: Path
    boxes: np.ndarray
    """float32[N, 4] x1, y1, x2, y2 pixels."""
    labels: tuple[str, ...]
    """Detector class name per box."""
    attributes: tuple[dict, ...] = ()
    codes: tuple[str, ...] = ()
    """Original dataset category per box (taxonomy code on synthetic data)."""
    case_id: str | None = None
    um_per_px: float | None = None


def detection_items(
    data_dir: Path, split: str, config, classes_mode: str = "auto"
) -> tuple[list[DetectionItem], tuple[str, ...]]:
    """Images of one split with boxes mapped to detector classes, and the class list.

    VOC: ImageSets/Main/<split>.txt (`test` falls back to `val` when the folder has no test
    list; BCCD's own test split is not distributed). COCO: the images of the split's cases.
    classes_mode `auto`: taxonomy data -> ("cell", "RBC"); other data -> its own classes.
    """
    from training.data.coco import read_coco
    from training.data.voc import read_voc

    data_dir = Path(data_dir)
    if is_voc(data_dir):
        name = split
        if not (data_dir / "ImageSets" / "Main" / f"{split}.txt").is_file() and split == "test":
            log.warning("%s has no test list; the held-out split is val", data_dir)
            name = "val"
        dataset = read_voc(data_dir, name)
        keep = {im.id for im in dataset.images}
    else:
        dataset = read_coco(data_dir / "annotations.json")
        wanted = {r.case_id for r in load_cases(data_dir, config) if r.split == split}
        keep = {im.id for im in dataset.images if im.case_id in wanted}
    if classes_mode == "auto":
        classes = SYNTH_DETECTOR_CLASSES if dataset.is_taxonomy else tuple(dataset.categories)
    elif classes_mode == "dataset":
        classes = tuple(dataset.categories)
    else:
        raise UsageError(f"classes_mode must be auto or dataset, got {classes_mode!r}")
    items = dataset_items(dataset, keep, classes)
    if not items:
        raise UsageError(f"{data_dir}: split {split!r} has no images")
    return items, tuple(classes)


def dataset_items(dataset, keep: set[int], classes: tuple[str, ...]) -> list[DetectionItem]:
    """`DetectionItem`s of the images of `dataset` (a `training.data.coco.Dataset`) whose
    ids are in `keep`, in dataset order, crowd boxes left out. Taxonomy categories map to
    the detector's `SYNTH_DETECTOR_CLASSES` when those are the `classes` (`RBC` stays,
    every other code is a `cell`); other categories are kept as they are."""
    taxonomy = dataset.is_taxonomy

    def mapped(category: str) -> str:
        if tuple(classes) == SYNTH_DETECTOR_CLASSES and taxonomy:
            return "RBC" if category == "RBC" else "cell"
        return category

    by_image = dataset.annotations_by_image()
    items = []
    for im in dataset.images:
        if im.id not in keep:
            continue
        anns = [a for a in by_image[im.id] if not a.iscrowd]
        boxes = np.array(
            [[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]] for a in anns],
            dtype=np.float32,
        ).reshape(-1, 4)
        items.append(
            DetectionItem(
                dataset.image_path(im),
                boxes,
                tuple(mapped(a.category) for a in anns),
                tuple(a.attributes for a in anns),
                tuple(a.category for a in anns),
                im.case_id,
                im.um_per_px,
            )
        )
    return items


def real_import_reports(data_dir: Path) -> dict[str, dict[str, object]]:
    """`ReadReport.as_dict()` of each real single-cell set under `data_dir` (CSV only, no
    image decoding): what a real-data report says about the import, unknown class folders
    included."""
    from training.data.deepapl import read_deepapl
    from training.data.pbc import read_pbc

    out: dict[str, dict[str, object]] = {}
    if (data_dir / "deepapl" / "cells.csv").is_file():
        out["deepapl"] = read_deepapl(data_dir / "deepapl", verify=False).report.as_dict()
    if (data_dir / "pbc" / "cells.csv").is_file():
        out["pbc"] = read_pbc(data_dir / "pbc", verify=False).report.as_dict()
    return out


def real_cell_splits(data_dir: Path, config, *, strict: bool = False) -> dict[str, list]:
    """train / val / test / external lists of `CellRecord`s from the real single-cell sets
    under `data_dir` (`deepapl/`, `pbc/`), for the sources in config `real_train_sources`.

    DeepAPL: labelled cells only, split by patient (`split_patients` over every patient with
    readable cells, stratified by diagnosis, config `test_fraction` / `val_fraction` /
    `split_seed`: the APL case model gets the same sides from the same call). PBC (no patient
    ids): train/val by file (`pbc_split="train_val"`) or train/val/test by file (`"file"`,
    and always when PBC is the only training source). A source not trained on is
    `external`: all of PBC, or DeepAPL's test patients. `strict`: a class folder the
    taxonomy lacks stops the read (else it is reported, see `training.data.singlecell`).
    """
    from training.data.deepapl import read_deepapl
    from training.data.pbc import read_pbc
    from training.data.singlecell import split_files, split_patients

    train_on = set(config["real_train_sources"])
    out: dict[str, list] = {"train": [], "val": [], "test": [], "external": []}
    tf, vf, seed = config["test_fraction"], config["val_fraction"], config["split_seed"]
    if (data_dir / "deepapl" / "cells.csv").is_file():
        dap = read_deepapl(data_dir / "deepapl", verify=False, strict=strict)
        sides = split_patients(dap.records, test_fraction=tf, val_fraction=vf, seed=seed)
        for r in dap.labelled():
            side = sides[r.patient]
            if "deepapl" in train_on:
                out[side].append(r)
            elif side == "test":
                out["external"].append(r)
    elif "deepapl" in train_on:
        raise UsageError(f"{data_dir}/deepapl/cells.csv not found but deepapl is trained on")
    if (data_dir / "pbc" / "cells.csv").is_file():
        recs = read_pbc(data_dir / "pbc", verify=False, strict=strict).records
        if "pbc" in train_on:
            mode = config["pbc_split"]
            if mode not in ("train_val", "file"):
                raise UsageError(f"pbc_split must be train_val or file, got {mode!r}")
            by_file = mode == "file" or train_on == {"pbc"}
            labels = split_files(
                len(recs),
                test_fraction=tf if by_file else 0.0,
                val_fraction=vf if by_file else vf / (1 - tf),
                seed=seed,
            )
            for r, side in zip(recs, labels, strict=True):
                out[side].append(r)
        else:
            out["external"].extend(recs)
    elif "pbc" in train_on:
        raise UsageError(f"{data_dir}/pbc/cells.csv not found but pbc is trained on")
    return out
