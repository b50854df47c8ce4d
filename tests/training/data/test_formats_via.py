"""VIA 2.x projects: write -> read round trip, hand-made projects, masks, proposals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from marrowscope import taxonomy
from training.data.coco import Annotation, Dataset, DatasetFormatError, ImageRecord
from training.data.via import (
    predictions_to_via,
    read_via,
    rle_to_polygon,
    to_via_dict,
    write_via,
)

FLAGS = {a: False for a in taxonomy.ATTRIBUTE_CODES}


def _dataset(root) -> Dataset:
    images = [
        ImageRecord(7, "images/C1_0.png", 120, 90, "C1", "P1", 0.3),
        ImageRecord(9, "images/C2_0.png", 64, 48),
    ]
    poly = [10.5, 12.0, 30.25, 14.0, 28.0, 40.75, 9.0, 33.0]
    anns = [
        Annotation(
            1,
            7,
            "BLA",
            (1.5, 2.0, 20.0, 18.25),
            None,
            None,
            {**FLAGS, "auer_rod": True, "prominent_nucleoli": True},
            score=0.9125,
        ),
        Annotation(2, 7, "NGS", (9.0, 12.0, 21.25, 28.75), [poly], None, FLAGS),
        Annotation(3, 9, "RBC", (0.0, 0.0, 64.0, 48.0), None, None, FLAGS),
    ]
    return Dataset(images, anns, taxonomy.CODES, root)


def test_round_trip_keeps_everything_via_can_hold(tmp_path):
    ds = _dataset(tmp_path)
    back = read_via(write_via(ds, tmp_path / "project.json"))
    assert back.images == ds.images
    assert back.annotations == ds.annotations
    assert back.categories == ds.categories
    assert back.report.clipped_boxes == 0 and back.report.dropped_empty_boxes == 0


def test_written_project_has_via_layout(tmp_path):
    raw = to_via_dict(_dataset(tmp_path))
    assert raw["_via_data_format_version"].startswith("2.")
    key = raw["_via_image_id_list"][0]
    entry = raw["_via_img_metadata"][key]
    assert key == "images/C1_0.png-1" and entry["size"] == -1  # image absent: size unknown
    shapes = [r["shape_attributes"]["name"] for r in entry["regions"]]
    assert shapes == ["rect", "polygon"]
    first = entry["regions"][0]["region_attributes"]
    assert first["cell_type"] == "BLA"
    assert first["flags"] == {"auer_rod": True, "prominent_nucleoli": True}
    assert list(raw["_via_attributes"]["region"]["flags"]["options"]) == list(
        taxonomy.ATTRIBUTE_CODES
    )
    rect_only = to_via_dict(_dataset(tmp_path), shape="rect")
    regions = rect_only["_via_img_metadata"][key]["regions"]
    assert {r["shape_attributes"]["name"] for r in regions} == {"rect"}
    with pytest.raises(ValueError, match="no mask"):
        to_via_dict(_dataset(tmp_path), shape="polygon")


def test_own_categories_round_trip(tmp_path):
    images = [ImageRecord(1, "x.jpg", 50, 40)]
    anns = [
        Annotation(
            1, 1, "WBC", (3.0, 4.0, 10.0, 10.0), None, None, {"difficult": False, "truncated": True}
        )
    ]
    ds = Dataset(images, anns, ("Platelets", "RBC", "WBC"), tmp_path)
    back = read_via(write_via(ds, tmp_path / "p.json"), taxonomy_categories=False)
    assert back.categories == ds.categories and back.annotations == ds.annotations


def _hand_made(tmp_path, regions, file_attributes=None):
    project = {
        "_via_settings": {"core": {"default_filepath": ""}},
        "_via_img_metadata": {
            "s.png123": {
                "filename": "s.png",
                "size": 123,
                "regions": regions,
                "file_attributes": (
                    {"width": "100", "height": "80"} if file_attributes is None else file_attributes
                ),
            }
        },
        "_via_attributes": {
            "region": {
                "cell_type": {"type": "dropdown", "options": {}},
                "flags": {"type": "checkbox", "options": {}},
            }
        },
    }
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(project))
    return path


def test_hand_made_shapes(tmp_path):
    regions = [
        {
            "shape_attributes": {"name": "circle", "cx": 50, "cy": 40, "r": 10},
            "region_attributes": {"cell_type": "lyt", "flags": {"condensed_chromatin": True}},
        },
        {
            "shape_attributes": {
                "name": "ellipse",
                "cx": 20,
                "cy": 20,
                "rx": 10,
                "ry": 5,
                "theta": np.pi / 2,
            },
            "region_attributes": {"cell_type": "MON"},
        },
        {
            "shape_attributes": {"name": "rect", "x": 90, "y": 70, "width": 30, "height": 30},
            "region_attributes": {"cell_type": "RBC", "flags": {}},
        },
        {
            "shape_attributes": {"name": "point", "cx": 5, "cy": 5},
            "region_attributes": {"cell_type": "RBC"},
        },
    ]
    ds = read_via(_hand_made(tmp_path, regions))
    circle, ellipse, rect = ds.annotations
    assert circle.category == "LYT" and circle.attributes["condensed_chromatin"]
    assert not circle.attributes["auer_rod"]
    assert circle.bbox == pytest.approx((40.0, 30.0, 20.0, 20.0))
    assert len(circle.segmentation[0]) == 64
    assert ellipse.bbox == pytest.approx((15.0, 10.0, 10.0, 20.0))  # rotated 90 degrees
    assert rect.bbox == (90.0, 70.0, 10.0, 10.0)
    assert ds.report.clipped_boxes == 1
    assert "1 regions of unsupported shape 'point' dropped" in ds.report.summary()


def test_hand_made_errors(tmp_path):
    no_type = [
        {
            "shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5},
            "region_attributes": {},
        }
    ]
    with pytest.raises(DatasetFormatError, match="region 0: cell_type '<missing>'"):
        read_via(_hand_made(tmp_path, no_type))
    assert read_via(_hand_made(tmp_path, no_type), drop_unknown=True).report.unknown_categories == {
        "<missing>": 1
    }
    bad_flag = [
        {
            "shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5},
            "region_attributes": {"cell_type": "BLA", "flags": {"glitter": True}},
        }
    ]
    with pytest.raises(DatasetFormatError, match="unknown flags"):
        read_via(_hand_made(tmp_path, bad_flag))
    with pytest.raises(DatasetFormatError, match="not found"):
        read_via(_hand_made(tmp_path, [], file_attributes={}))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(DatasetFormatError, match="bad.json: malformed JSON"):
        read_via(tmp_path / "bad.json")


def test_rle_mask_becomes_a_close_polygon():
    from pycocotools import mask as mask_utils

    yy, xx = np.mgrid[:60, :80]
    mask = (((xx - 40.0) / 25) ** 2 + ((yy - 30.0) / 18) ** 2 <= 1).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    poly = rle_to_polygon({"size": rle["size"], "counts": rle["counts"].decode()})
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], 60, 80)))
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.95
    xs, ys = poly[0::2], poly[1::2]
    cols, rows = np.nonzero(mask.any(0))[0], np.nonzero(mask.any(1))[0]
    assert min(xs) == pytest.approx(cols[0], abs=1) and max(xs) == pytest.approx(
        cols[-1] + 1, abs=1
    )
    assert min(ys) == pytest.approx(rows[0], abs=1) and max(ys) == pytest.approx(
        rows[-1] + 1, abs=1
    )
    empty = mask_utils.encode(np.zeros((5, 5), dtype=np.uint8, order="F"))
    assert rle_to_polygon(empty) is None


def test_predictions_to_via_and_back(tmp_path):
    images = [ImageRecord(1, "a.png", 100, 80), ImageRecord(2, "b.png", 100, 80)]
    boxes = np.array([[10, 10, 30, 35], [50, 20, 70, 40], [0, 0, 5, 5]], dtype=np.float32)
    path = predictions_to_via(
        images,
        {1: (boxes, ["BLA", "RBC", "LYT"], [0.9, 0.6, 0.1])},
        tmp_path / "proposals.json",
        score_threshold=0.5,
    )
    back = read_via(path)
    assert [(a.image_id, a.category, a.bbox, a.score) for a in back.annotations] == [
        (1, "BLA", (10.0, 10.0, 20.0, 25.0), pytest.approx(0.9)),
        (1, "RBC", (50.0, 20.0, 20.0, 20.0), pytest.approx(0.6)),
    ]
    assert [im.id for im in back.images] == [1, 2]
    with pytest.raises(ValueError, match="not in"):
        predictions_to_via(images, {1: (boxes[:1], ["XYZ"], [0.9])}, tmp_path / "p.json")
    with pytest.raises(ValueError, match="unknown image ids"):
        predictions_to_via(images, {5: (boxes[:1], ["BLA"], [0.9])}, tmp_path / "p.json")


def test_rle_annotations_export_as_polygons_with_the_mask_box(tmp_path):
    from pycocotools import mask as mask_utils

    m = np.zeros((30, 40), dtype=np.uint8, order="F")
    m[5:20, 8:30] = 1
    m[5:9, 8:12] = 0  # a notch so the outline is not a rectangle
    rle = mask_utils.encode(m)
    seg = {"size": [30, 40], "counts": rle["counts"].decode("ascii")}
    box = tuple(float(v) for v in mask_utils.toBbox(rle))
    ds = Dataset(
        [ImageRecord(1, "m.png", 40, 30)],
        [Annotation(1, 1, "MYB", box, seg, seg, FLAGS)],
        taxonomy.CODES,
        tmp_path,
    )
    back = read_via(write_via(ds, tmp_path / "p.json")).annotations[0]
    assert back.bbox == box
    poly = back.segmentation[0]
    assert len(poly) == 2 * 12  # six corners, each cut by a half-pixel diagonal
    rast = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], 30, 40)))
    assert np.array_equal(rast, m)
    assert back.nucleus_segmentation is None  # VIA holds one shape per region
