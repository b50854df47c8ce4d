"""Pascal VOC reader: hand-made folder (clipping, empty boxes, errors) and the real BCCD set."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from training.data.coco import DatasetFormatError
from training.data.voc import read_voc


def _xml(name, objects, size=(64, 48)):
    objs = "".join(
        f"<object><name>{n}</name><truncated>{t}</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, t in objects
    )
    return (
        f"<annotation><filename>{name}.jpg</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    files = {
        "a": [("WBC", (1, 1, 20, 10), 0), ("RBC", (50, 40, 70, 50), 1)],  # 2nd crosses border
        "b": [("Platelets", (5, 5, 5, 9), 0), ("RBC", (10, 10, 30, 30), 0)],  # 1st is empty
    }
    for name, objects in files.items():
        (tmp_path / "Annotations" / f"{name}.xml").write_text(_xml(name, objects))
        Image.new("RGB", (64, 48)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
    (tmp_path / "ImageSets/Main/train.txt").write_text("a\n")
    (tmp_path / "ImageSets/Main/val.txt").write_text("b\n")
    return tmp_path


def test_reads_boxes_as_continuous_coco_and_clips(voc_root):
    ds = read_voc(voc_root)
    assert ds.categories == ("Platelets", "RBC", "WBC")
    assert len(ds.images) == 2 and ds.images[0].file_name == "JPEGImages/a.jpg"
    boxes = [(a.category, a.bbox) for a in ds.annotations]
    assert boxes == [
        ("WBC", (0.0, 0.0, 20.0, 10.0)),
        ("RBC", (49.0, 39.0, 15.0, 9.0)),
        ("RBC", (9.0, 9.0, 21.0, 21.0)),
    ]
    assert ds.annotations[1].attributes == {"difficult": False, "truncated": True}
    assert ds.report.clipped_boxes == 1
    assert ds.report.dropped_empty_boxes == 1
    assert "1 empty boxes dropped" in ds.report.summary()


def test_splits_and_class_map(voc_root):
    train = read_voc(voc_root, "train")
    assert [im.case_id for im in train.images] == ["a"]
    val = read_voc(voc_root, "val", class_map={"RBC": None}, classes=("WBC", "Platelets"))
    assert val.annotations == [] and val.report.unknown_categories == {"RBC": 1}
    with pytest.raises(DatasetFormatError, match="not in classes"):
        read_voc(voc_root, "train", classes=("WBC",))
    with pytest.raises(DatasetFormatError, match="test.txt"):
        read_voc(voc_root, "test")


def test_missing_image_is_counted(voc_root):
    (voc_root / "JPEGImages" / "b.jpg").unlink()
    ds = read_voc(voc_root)
    assert len(ds.images) == 1 and ds.report.missing_images == 1


def test_malformed_xml_names_the_file(voc_root):
    (voc_root / "Annotations" / "b.xml").write_text("<annotation><filename>b.jpg</filen")
    with pytest.raises(DatasetFormatError, match=r"b\.xml: malformed XML"):
        read_voc(voc_root)
    (voc_root / "Annotations" / "b.xml").write_text(_xml("b", [("RBC", ("x", 1, 2, 3), 0)]))
    with pytest.raises(DatasetFormatError, match=r"b\.xml object\[0\].*not a number"):
        read_voc(voc_root)


@pytest.mark.parametrize("split, n_images", [("train", 205), ("val", 87)])
def test_bccd_splits(shared_data, split, n_images):
    root = shared_data / "bccd"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ds = read_voc(root, split)
    assert len(ds.images) == n_images
    assert ds.categories == ("Platelets", "RBC", "WBC")
    assert ds.report.missing_images == 0
    # every <object> is either kept or counted as dropped
    ids = (root / "ImageSets/Main" / f"{split}.txt").read_text().split()
    n_objects = sum(
        len(re.findall(r"<object>", (root / "Annotations" / f"{i}.xml").read_text())) for i in ids
    )
    assert len(ds.annotations) + ds.report.dropped_empty_boxes == n_objects
    for a in ds.annotations:
        im = ds.images[a.image_id - 1]
        x, y, w, h = a.bbox
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im.width and y + h <= im.height
    print(f"BCCD {split}: {ds.report.summary()}")
