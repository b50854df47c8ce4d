"""COCO reader/writer: contract layout, round trip, clipping, unknown categories, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from marrowscope import taxonomy
from training.data.coco import (
    Annotation,
    Dataset,
    DatasetFormatError,
    ImageRecord,
    read_coco,
    write_coco,
)


def _png(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 180, 190)).save(path)


def _rle(h, w, y0, y1, x0, x1):
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def make_dataset(root) -> Dataset:
    for name in ("C0001_0", "C0002_0"):
        _png(root / "images" / f"{name}.png")
    images = [
        ImageRecord(1, "images/C0001_0.png", 40, 30, "C0001", "P01", 0.25),
        ImageRecord(2, "images/C0002_0.png", 40, 30, "C0002", "P02", 0.5),
    ]
    flags = {a: False for a in taxonomy.ATTRIBUTE_CODES}
    anns = [
        Annotation(
            1,
            1,
            "BLA",
            (2.0, 3.0, 10.0, 8.0),
            _rle(30, 40, 3, 11, 2, 12),
            _rle(30, 40, 5, 9, 4, 10),
            {**flags, "auer_rod": True},
        ),
        Annotation(
            2,
            1,
            "RBC",
            (20.5, 4.25, 6.0, 6.0),
            [[20.5, 4.25, 26.5, 4.25, 26.5, 10.25, 20.5, 10.25]],
            None,
            flags,
        ),
        Annotation(3, 2, "LYT", (1.0, 1.0, 5.0, 5.0), None, None, flags, score=0.75),
    ]
    return Dataset(images, anns, taxonomy.CODES, root, {"generator": "test", "seed": 1})


def test_round_trip_is_identical(tmp_path):
    ds = make_dataset(tmp_path)
    path = write_coco(ds, tmp_path / "annotations.json")
    back = read_coco(path)
    assert back.images == ds.images
    assert back.annotations == ds.annotations
    assert back.categories == ds.categories
    assert back.info == ds.info
    assert back.report is not None and back.report.clipped_boxes == 0
    raw = json.loads(path.read_text())
    assert raw["categories"] == taxonomy.coco_categories()
    first = raw["annotations"][0]
    assert first["category_id"] == taxonomy.CATEGORY_IDS["BLA"]
    assert first["area"] == 80.0  # mask pixel count, not the box
    assert set(first["attributes"]) == set(taxonomy.ATTRIBUTE_CODES)
    assert "nucleus_segmentation" not in raw["annotations"][1]


def test_clips_and_drops_boxes_and_reports(tmp_path, caplog):
    ds = make_dataset(tmp_path)
    raw = json.loads(write_coco(ds, tmp_path / "a.json").read_text())
    raw["annotations"][0]["bbox"] = [-4.0, 25.0, 10.0, 10.0]  # crosses two borders
    raw["annotations"][1]["bbox"] = [41.0, 2.0, 5.0, 5.0]  # wholly outside -> empty
    raw["annotations"][2]["bbox"] = [3.0, 3.0, 0.0, 4.0]  # zero width
    (tmp_path / "a.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        back = read_coco(tmp_path / "a.json")
    assert [a.bbox for a in back.annotations] == [(0.0, 25.0, 6.0, 5.0)]
    assert back.report.clipped_boxes == 1
    assert back.report.dropped_empty_boxes == 2
    assert "2 empty boxes dropped" in back.report.summary()
    assert "1 boxes clipped" in caplog.text


def test_unknown_category_raises_or_is_counted(tmp_path):
    ds = make_dataset(tmp_path)
    raw = json.loads(write_coco(ds, tmp_path / "a.json").read_text())
    raw["categories"].append({"id": 99, "name": "megakaryocyte"})
    raw["annotations"][2]["category_id"] = 99
    (tmp_path / "a.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetFormatError, match="megakaryocyte.*BLA, PMO"):
        read_coco(tmp_path / "a.json")
    back = read_coco(tmp_path / "a.json", drop_unknown=True)
    assert len(back.annotations) == 2
    assert back.report.unknown_categories == {"megakaryocyte": 1}
    mapped = read_coco(tmp_path / "a.json", class_map={"megakaryocyte": "PLM"})
    assert mapped.annotations[2].category == "PLM"
    own = read_coco(tmp_path / "a.json", taxonomy_categories=False)
    assert own.categories[-1] == "megakaryocyte" and own.annotations[2].category == "megakaryocyte"


def test_missing_images_are_dropped_and_counted(tmp_path):
    ds = make_dataset(tmp_path)
    write_coco(ds, tmp_path / "a.json")
    (tmp_path / "images" / "C0002_0.png").unlink()
    back = read_coco(tmp_path / "a.json")
    assert [im.id for im in back.images] == [1]
    assert all(a.image_id == 1 for a in back.annotations)
    assert back.report.missing_images == 1
    assert len(read_coco(tmp_path / "a.json", check_images=False).images) == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "malformed JSON"),
        ('{"images": []}', "not COCO instances"),
        (
            '{"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": []}',
            "file_name",
        ),
    ],
)
def test_malformed_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match=match) as info:
        read_coco(path)
    assert "broken.json" in str(info.value)


def test_annotation_of_unknown_image_is_an_error(tmp_path):
    ds = make_dataset(tmp_path)
    raw = json.loads(write_coco(ds, tmp_path / "a.json").read_text())
    raw["annotations"][0]["image_id"] = 7
    (tmp_path / "a.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetFormatError, match="image_id 7"):
        read_coco(tmp_path / "a.json")


def test_extra_keys_survive_read_and_write(tmp_path):
    ds = make_dataset(tmp_path)
    raw = json.loads(write_coco(ds, tmp_path / "a.json").read_text())
    raw["annotations"][0]["true_category_id"] = taxonomy.CATEGORY_IDS["PMO"]
    raw["images"][0]["stain"] = "MGG"
    (tmp_path / "a.json").write_text(json.dumps(raw))
    back = read_coco(tmp_path / "a.json")
    assert back.annotations[0].extra == {"true_category_id": taxonomy.CATEGORY_IDS["PMO"]}
    again = json.loads(write_coco(back, tmp_path / "b.json").read_text())
    assert again["annotations"] == raw["annotations"] and again["images"] == raw["images"]
