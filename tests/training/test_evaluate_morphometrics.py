"""Morphometrics evaluation: the real-data floor on wbc-seg and the synthetic COCO path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from marrowscope.taxonomy import CATEGORY_IDS, coco_categories
from tests.test_morphometrics import BACKGROUND, drawn_cell
from training.evaluate_morphometrics import dice, get_args_parser, main, nc_ratio

NUCLEUS_DICE_FLOOR = 0.85


def test_wbc_seg_nucleus_dice_floor(shared_data, capsys):
    data = shared_data / "wbc-seg"
    if not (data / "images").is_dir():
        pytest.skip(f"{data} is absent (see ../shared/data/README.md)")
    summary = main(get_args_parser().parse_args(["--data", str(data)]))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary and last["synthetic"] is False
    assert summary["n"] == len(list((data / "images").glob("*.png")))
    assert summary["nucleus_dice_median"] >= NUCLEUS_DICE_FLOOR
    assert summary["cell_dice_median"] >= 0.9
    assert set(summary["per_class"]) <= {
        "neutrophil",
        "lymphocyte",
        "monocyte",
        "eosinophil",
        "basophil",
        "unknown",
    }


def _write_coco(tmp_path):
    """Tiny generator-shaped dataset: one field, two drawn cells and one RBC-like box."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    field = np.empty((160, 260, 3), np.uint8)
    field[:] = BACKGROUND
    masks = []
    for (y, x), seed in (((0, 0), 1), ((50, 140), 2)):
        crop, cell, nucleus = drawn_cell(size=100, cell_r=(30, 30), nuc_r=(14, 20), seed=seed)
        field[y : y + 100, x : x + 100] = crop
        full_c, full_n = np.zeros(field.shape[:2], bool), np.zeros(field.shape[:2], bool)
        full_c[y : y + 100, x : x + 100], full_n[y : y + 100, x : x + 100] = cell, nucleus
        masks.append((full_c, full_n))
    (tmp_path / "images").mkdir()
    Image.fromarray(field).save(tmp_path / "images" / "C0001_0.png")

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode()}

    anns = []
    for i, (c, n) in enumerate(masks, start=1):
        ys, xs = np.nonzero(c)
        bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
        anns.append(
            {
                "id": i,
                "image_id": 1,
                "category_id": CATEGORY_IDS["LYT"],
                "bbox": bbox,
                "area": int(c.sum()),
                "iscrowd": 0,
                "segmentation": rle(c),
                "nucleus_segmentation": rle(n),
                "attributes": {},
            }
        )
    anns.append(
        {
            "id": 3,
            "image_id": 1,
            "category_id": CATEGORY_IDS["RBC"],
            "bbox": [200.0, 0.0, 20.0, 20.0],
            "area": 300,
            "iscrowd": 0,
            "segmentation": rle(np.zeros(field.shape[:2], bool)),
            "attributes": {},
        }
    )
    coco = {
        "info": {"generator": "test"},
        "categories": coco_categories(),
        "annotations": anns,
        "images": [
            {
                "id": 1,
                "file_name": "images/C0001_0.png",
                "width": 260,
                "height": 160,
                "case_id": "C0001",
                "patient_id": "P1",
                "um_per_px": 0.1,
            }
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path


def test_synthetic_coco_mode_scores_cells_on_box_crops(tmp_path, capsys):
    data = _write_coco(tmp_path)
    summary = main(get_args_parser().parse_args(["--synthetic", str(data)]))
    assert summary["synthetic"] is True
    assert summary["n"] == 2  # the RBC has no nucleus_segmentation and is skipped
    assert summary["nucleus_dice_median"] > 0.9 and summary["cell_dice_median"] > 0.95
    assert set(summary["per_class"]) == {"LYT"}
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["nucleus_dice_median"] == summary["nucleus_dice_median"]
    limited = main(get_args_parser().parse_args(["--synthetic", str(data), "--max-cells", "1"]))
    assert limited["n"] == 1


def test_flags_are_exclusive_and_required():
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([])
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data", "a", "--synthetic", "b"])


def test_dice_and_nc_helpers():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    cell = np.ones((4, 4), bool)
    nucleus = np.zeros((4, 4), bool)
    nucleus[:2] = True
    assert nc_ratio(nucleus, cell) == pytest.approx(1.0)
