"""Check the classical nucleus/cytoplasm split against expert or synthetic ground truth.

Real data (`--data DIR`, the wbc-seg folder of ../shared/data): `images/NNN.png` RGB crops
of one white cell, `masks/NNN.png` with 255 nucleus, 128 cytoplasm, 0 background (red
cells included), `labels.csv` (image id -> class 1..5). `measure_cell` runs on each image
WITHOUT the mask; predicted nucleus and whole-cell masks are compared with the expert ones.

Synthetic data (`--synthetic DIR`, a dataset folder of the generator, COCO contract in
docs/CONTRACTS.md): every annotation with a `nucleus_segmentation` is cropped around its box
(`box_window`, the same margin as the segmentation service), segmented without its mask and
compared with the generator's cell and nucleus masks. These figures are synthetic.

Prints one JSON object per line; the LAST line is the summary: medians and IQRs of nucleus
Dice, cell Dice and absolute N:C error (nucleus area / cytoplasm area), per class too.

    python -m training.evaluate_morphometrics --data ../shared/data/wbc-seg
    python -m training.evaluate_morphometrics --synthetic /tmp/synth --max-cells 500
    python -m training.evaluate_morphometrics --data ../shared/data/wbc-seg --splitter DIR

`--splitter` scores a learned split (a nucseg model directory or `models:/` URI, see
`marrowscope.models.nucseg`) instead of the classical one, on the same cells.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from marrowscope.errors import InvalidInput
from marrowscope.morphometrics import NC_RATIO_MAX, Splitter, box_window, measure_cell

log = logging.getLogger(__name__)

WBC_SEG_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}
NUCLEUS_VALUE, CYTOPLASM_VALUE = 255, 128


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two bool masks of one shape; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def nc_ratio(nucleus: np.ndarray, cell: np.ndarray) -> float:
    """Nucleus area / cytoplasm area with the same floor and clip as `measure_cell`."""
    n = float((nucleus & cell).sum())
    return min(n / max(float(cell.sum()) - n, 1.0), NC_RATIO_MAX)


def compare(
    crop: np.ndarray,
    cell_truth: np.ndarray,
    nucleus_truth: np.ndarray,
    centre: tuple[float, float] | None = None,
    splitter: Splitter | None = None,
) -> dict[str, float]:
    """Segment `crop` (uint8 [H, W, 3]) without its mask and score it against the truth
    (classical split, or `splitter`'s)."""
    m = measure_cell(crop, centre=centre, splitter=splitter)
    pred_nc = nc_ratio(m.nucleus_mask, m.cell_mask)
    true_nc = nc_ratio(nucleus_truth, cell_truth)
    return {
        "nucleus_dice": dice(m.nucleus_mask, nucleus_truth),
        "cell_dice": dice(m.cell_mask, cell_truth),
        "nc_pred": pred_nc,
        "nc_true": true_nc,
        "nc_abs_err": abs(pred_nc - true_nc),
        "segmentation_ok": m.features["segmentation_ok"],
    }


def _stats(values: list[float]) -> dict[str, float | list[float]]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": round(float(med), 4), "iqr": [round(float(q1), 4), round(float(q3), 4)]}


def summarise(records: list[dict], dataset: str, synthetic: bool) -> dict:
    """Medians and IQRs over `records` (each with the `compare` keys and a `class`)."""
    if not records:
        raise InvalidInput(f"no cells to evaluate in {dataset}")
    keys = ("nucleus_dice", "cell_dice", "nc_abs_err")
    out: dict = {"dataset": dataset, "synthetic": synthetic, "n": len(records)}
    for k in keys:
        s = _stats([r[k] for r in records])
        out[f"{k}_median"], out[f"{k}_iqr"] = s["median"], s["iqr"]
    out["failed"] = sum(1 for r in records if not r["segmentation_ok"])
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_class[r["class"]].append(r)
    out["per_class"] = {
        name: {"n": len(rs), **{k: _stats([r[k] for r in rs]) for k in keys}}
        for name, rs in sorted(by_class.items())
    }
    return out


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def wbc_seg_labels(data_dir: Path) -> dict[str, str]:
    """wbc-seg `labels.csv`: image id (`NNN`) -> class name; {} when the file is absent."""
    labels: dict[str, str] = {}
    labels_csv = data_dir / "labels.csv"
    if labels_csv.is_file():
        with labels_csv.open(newline="") as f:
            for row in csv.reader(f):
                if row and row[0].strip().isdigit():
                    labels[f"{int(row[0]):03d}"] = WBC_SEG_CLASSES.get(int(row[1]), "unknown")
    return labels


def iter_wbc_seg(data_dir: Path, splitter: Splitter | None = None) -> Iterable[dict]:
    """Score every image of the wbc-seg folder; yields one record per image."""
    from PIL import Image

    labels = wbc_seg_labels(data_dir)
    images = sorted((data_dir / "images").glob("*.png"))
    if not images:
        raise InvalidInput(f"no images/*.png under {data_dir}")
    for path in images:
        mask_path = data_dir / "masks" / path.name
        if not mask_path.is_file():
            raise InvalidInput(f"missing expert mask {mask_path}")
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L"))
        crop = _read_rgb(path)
        rec = compare(crop, mask > 0, mask == NUCLEUS_VALUE, splitter=splitter)
        yield {"id": path.stem, "class": labels.get(path.stem, "unknown"), **rec}


def iter_synthetic(
    data_dir: Path, max_cells: int | None, margin: float, splitter: Splitter | None = None
) -> Iterable[dict]:
    """Score generator cells (COCO `segmentation` + `nucleus_segmentation`) on box crops."""
    from pycocotools import mask as mask_utils

    from marrowscope.taxonomy import CODE_BY_CATEGORY_ID

    ann_path = data_dir / "annotations.json"
    if not ann_path.is_file():
        raise InvalidInput(f"{ann_path} not found (expected a generator dataset folder)")
    coco = json.loads(ann_path.read_text())
    images = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in coco["annotations"]:
        if ann.get("nucleus_segmentation"):
            by_image[ann["image_id"]].append(ann)
    done = 0
    for image_id in sorted(by_image):
        info = images[image_id]
        rgb = _read_rgb(data_dir / info["file_name"])
        for ann in by_image[image_id]:
            if max_cells is not None and done >= max_cells:
                return
            x, y, w, h = ann["bbox"]
            window = box_window(rgb.shape[:2], (x, y, x + w, y + h), margin)
            if window is None:
                continue
            (y0, y1, x0, x1), centre = window
            cell = mask_utils.decode(ann["segmentation"]).astype(bool)[y0:y1, x0:x1]
            nucleus = mask_utils.decode(ann["nucleus_segmentation"]).astype(bool)[y0:y1, x0:x1]
            rec = compare(rgb[y0:y1, x0:x1], cell, nucleus, centre, splitter)
            code = CODE_BY_CATEGORY_ID.get(int(ann["category_id"]), "unknown")
            yield {"id": int(ann["id"]), "class": code, **rec}
            done += 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="wbc-seg folder (images/, masks/, labels.csv)")
    src.add_argument("--synthetic", type=Path, help="generator dataset folder (COCO)")
    p.add_argument("--max-cells", type=int, default=None, help="synthetic: stop after N cells")
    p.add_argument("--margin", type=float, default=0.15, help="synthetic: box margin fraction")
    p.add_argument("--per-image", action="store_true", help="also print one line per cell")
    p.add_argument(
        "--splitter",
        default=None,
        help="learned split to score instead of the classical one: nucseg model directory "
        "or models:/marrowscope-nucseg@champion",
    )
    return p


def main(args: argparse.Namespace) -> dict:
    if args.max_cells is not None and args.max_cells <= 0:
        raise SystemExit("--max-cells must be positive")
    splitter = None
    if args.splitter:
        from marrowscope.models.nucseg import LearnedSplitter
        from marrowscope.registry import resolve

        resolved = resolve(args.splitter, name="marrowscope-nucseg")
        splitter = LearnedSplitter.from_dir(resolved.local_dir, version=resolved.version)
    start = time.perf_counter()
    if args.data is not None:
        if not args.data.is_dir():
            raise SystemExit(f"{args.data} is not a folder")
        records = list(iter_wbc_seg(args.data, splitter))
        summary = summarise(records, dataset=str(args.data), synthetic=False)
    else:
        records = list(iter_synthetic(args.synthetic, args.max_cells, args.margin, splitter))
        summary = summarise(records, dataset=str(args.synthetic), synthetic=True)
    summary["split"] = "classical" if splitter is None else f"learned {splitter.version}"
    summary["ms_per_cell"] = round(1000 * (time.perf_counter() - start) / len(records), 2)
    if args.per_image:
        for r in records:
            print(json.dumps(r))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(get_args_parser().parse_args())
