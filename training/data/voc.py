"""Pascal VOC reader (e.g. the BCCD blood-cell set in ../shared/data/bccd).

Layout: ROOT/Annotations/<id>.xml, ROOT/JPEGImages/<file>, ROOT/ImageSets/Main/<split>.txt.
VOC boxes are 1-based inclusive pixel indices; they become continuous COCO boxes
`(xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)`, clipped to the image; a box with
`xmax <= xmin` or `ymax <= ymin` (a click rather than a drag: BCCD has two) counts as empty
and is dropped. VOC data
keeps its own class names (BCCD: `Platelets`, `RBC`, `WBC`) unless `class_map` maps them.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from training.data.coco import (
    Annotation,
    Dataset,
    DatasetFormatError,
    ImageRecord,
    LoadReport,
    clip_box,
)

log = logging.getLogger(__name__)


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetFormatError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    value = _text(node, tag, where)
    try:
        return float(value)
    except ValueError:
        raise DatasetFormatError(f"{where}: <{tag}> is not a number: {value!r}") from None


def _image_size(root: Path, tree: ET.Element, file_name: str, where: str) -> tuple[int, int]:
    size = tree.find("size")
    if size is not None:
        w, h = _number(size, "width", where), _number(size, "height", where)
        if w > 0 and h > 0:
            return int(w), int(h)
    from PIL import Image  # header only: a missing <size> is common in hand-made VOC files

    with Image.open(root / file_name) as im:
        return im.size


def read_voc(
    root: str | Path,
    split: str | None = None,
    *,
    class_map: Mapping[str, str | None] | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Read a Pascal VOC folder into a `Dataset` with the dataset's own category names.

    split: None reads every Annotations/*.xml; otherwise ids from ImageSets/Main/<split>.txt.
    class_map: VOC name -> category name (None drops the class, counted as unknown).
    classes: the category order (COCO ids); default: sorted names found after mapping.
      With `classes`, names outside it raise DatasetFormatError.
    Boxes crossing the border are clipped, empty ones dropped; images whose file is
    missing are dropped; all counted in `dataset.report` (logged).
    """
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DatasetFormatError(f"{root}: not a VOC folder (no Annotations/)")
    if split is None:
        xml_files = sorted(ann_dir.glob("*.xml"))
    else:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetFormatError(f"{list_file}: split list not found")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        xml_files = [ann_dir / f"{i}.xml" for i in ids]
    report = LoadReport(source=f"{root} ({split or 'all'})")
    images: list[ImageRecord] = []
    raw: list[tuple[int, str, tuple[float, float, float, float], dict[str, bool]]] = []
    for xml_path in xml_files:
        if not xml_path.is_file():
            raise DatasetFormatError(f"{xml_path}: listed in split {split!r} but not found")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            raise DatasetFormatError(f"{xml_path}: malformed XML: {exc}") from None
        where = str(xml_path)
        file_name = f"JPEGImages/{_text(tree, 'filename', where)}"
        if not (root / file_name).is_file():
            report.missing_images += 1
            continue
        width, height = _image_size(root, tree, file_name, where)
        image_id = len(images) + 1
        images.append(
            ImageRecord(
                id=image_id, file_name=file_name, width=width, height=height, case_id=xml_path.stem
            )
        )
        for k, obj in enumerate(tree.findall("object")):
            owhere = f"{where} object[{k}]"
            box = obj.find("bndbox")
            if box is None:
                raise DatasetFormatError(f"{owhere}: missing <bndbox>")
            x1, y1, x2, y2 = (_number(box, t, owhere) for t in ("xmin", "ymin", "xmax", "ymax"))
            flags = {}
            for tag in ("difficult", "truncated"):
                node = obj.find(tag)
                flags[tag] = node is not None and (node.text or "0").strip() == "1"
            # a degenerate box is dropped as empty below
            corners = (x1, y1, x1, y1) if x2 <= x1 or y2 <= y1 else (x1 - 1, y1 - 1, x2, y2)
            raw.append((image_id, _text(obj, "name", owhere), corners, flags))

    mapped = [(class_map or {}).get(n, n) for _, n, _, _ in raw]
    categories = (
        tuple(classes)
        if classes is not None
        else tuple(sorted({m for m in mapped if m is not None}))
    )
    sizes = {im.id: (im.width, im.height) for im in images}
    annotations: list[Annotation] = []
    for (image_id, name, corners, flags), category in zip(raw, mapped, strict=True):
        if category is None:
            report.unknown_categories[name] += 1
            continue
        if category not in categories:
            raise DatasetFormatError(f"{root}: class {name!r} is not in classes {categories}")
        bbox, clipped = clip_box(*corners, *sizes[image_id])
        if bbox is None:
            report.dropped_empty_boxes += 1
            continue
        report.clipped_boxes += clipped
        annotations.append(
            Annotation(
                id=len(annotations) + 1,
                image_id=image_id,
                category=category,
                bbox=bbox,
                attributes=flags,
            )
        )
    report.images, report.annotations = len(images), len(annotations)
    report.log()
    return Dataset(
        images=images,
        annotations=annotations,
        categories=categories,
        root=root,
        info={"source": "pascal_voc", "split": split},
        report=report,
    )
