"""In-memory annotation model shared by every format reader, and COCO read/write.

Every reader (`read_coco`, `read_voc`, `read_via`) returns a `Dataset`; every writer takes
one. Boxes are always `(x, y, w, h)` float pixels with the origin at the top-left corner of
the top-left pixel (COCO convention). Categories are names: taxonomy codes
(`marrowscope.taxonomy.CODES`) for data from the generator, or the dataset's own class
names (e.g. BCCD's `WBC`, `RBC`, `Platelets`) when a reader is told to keep them.

The COCO layout is the one in docs/CONTRACTS.md ("Dataset folder").
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marrowscope import taxonomy

log = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]
# Compressed RLE {"size": [h, w], "counts": str}, or COCO polygons [[x0, y0, x1, y1, ...], ...].
Segmentation = dict[str, Any] | list[list[float]]


class DatasetFormatError(ValueError):
    """An annotation file that cannot be read; the message names the file and the entry."""


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    """Path relative to `Dataset.root` (e.g. `images/C0001_0.png`)."""
    width: int
    height: int
    case_id: str | None = None
    patient_id: str | None = None
    um_per_px: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the COCO image entry, written back unchanged."""


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category: str
    """Taxonomy code, or the dataset's own class name (see `Dataset.categories`)."""
    bbox: BBox
    """x, y, w, h in float pixels."""
    segmentation: Segmentation | None = None
    nucleus_segmentation: Segmentation | None = None
    attributes: dict[str, bool] = field(default_factory=dict)
    score: float | None = None
    """Model confidence for proposals; None for human annotations."""
    iscrowd: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the COCO annotation (e.g. the generator's `true_category_id`), written
    back unchanged by `write_coco`; not carried by VIA."""


_IMAGE_KEYS = {"id", "file_name", "width", "height", "case_id", "patient_id", "um_per_px"}
_ANN_KEYS = {
    "id",
    "image_id",
    "category_id",
    "bbox",
    "area",
    "iscrowd",
    "segmentation",
    "nucleus_segmentation",
    "attributes",
    "score",
}


@dataclass
class LoadReport:
    """What a reader changed or dropped; `summary()` is logged by every reader."""

    source: str
    images: int = 0
    annotations: int = 0
    clipped_boxes: int = 0
    dropped_empty_boxes: int = 0
    unknown_categories: Counter[str] = field(default_factory=Counter)
    missing_images: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        unknown = sum(self.unknown_categories.values())
        text = (
            f"{self.source}: {self.images} images, {self.annotations} annotations kept; "
            f"{self.clipped_boxes} boxes clipped to the image, "
            f"{self.dropped_empty_boxes} empty boxes dropped, "
            f"{unknown} annotations of unknown categories dropped"
            + (f" {dict(self.unknown_categories)}" if unknown else "")
            + f", {self.missing_images} images missing on disk"
        )
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text

    def log(self) -> None:
        changed = (
            self.clipped_boxes
            or self.dropped_empty_boxes
            or self.missing_images
            or self.unknown_categories
            or self.notes
        )
        log.log(logging.WARNING if changed else logging.INFO, "%s", self.summary())


@dataclass
class Dataset:
    images: list[ImageRecord]
    annotations: list[Annotation]
    categories: tuple[str, ...] = taxonomy.CODES
    """Ordered category names; COCO ids are 1-based positions (taxonomy: CATEGORY_IDS)."""
    root: Path | None = None
    """Folder that `ImageRecord.file_name` is relative to."""
    info: dict[str, Any] = field(default_factory=dict)
    report: LoadReport | None = field(default=None, compare=False)

    @property
    def is_taxonomy(self) -> bool:
        return tuple(self.categories) == taxonomy.CODES

    def category_id(self, name: str) -> int:
        """1-based COCO category id of `name` (equals taxonomy.CATEGORY_IDS for codes)."""
        return self.categories.index(name) + 1

    def image_path(self, image: ImageRecord) -> Path:
        if self.root is None:
            raise ValueError("dataset has no root folder; image paths cannot be resolved")
        return self.root / image.file_name

    def annotations_by_image(self) -> dict[int, list[Annotation]]:
        """Image id -> its annotations (every image present, possibly with an empty list)."""
        out: dict[int, list[Annotation]] = {im.id: [] for im in self.images}
        for a in self.annotations:
            out[a.image_id].append(a)
        return out


def clip_box(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int
) -> tuple[BBox | None, bool]:
    """Clip corner box to [0, width] x [0, height]; returns ((x, y, w, h) or None if empty,
    clipped?)."""
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        return None, clipped
    return (float(cx1), float(cy1), float(cx2 - cx1), float(cy2 - cy1)), clipped


def resolve_category(
    name: str, categories: tuple[str, ...], class_map: Mapping[str, str | None] | None
) -> str | None:
    """Map a file's class name to a dataset category; None = dropped via class_map."""
    if class_map is not None and name in class_map:
        return class_map[name]
    if name in categories:
        return name
    if tuple(categories) == taxonomy.CODES and name.upper() in taxonomy.CODES:
        return name.upper()
    raise KeyError(name)


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: malformed JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text: {exc}") from None


def normalise_segmentation(seg: Any, where: str) -> Segmentation | None:
    """Compressed RLE with str counts, or a list of flat polygons; uncompressed RLE is
    compressed with pycocotools."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise DatasetFormatError(f"{where}: RLE needs 'size' and 'counts'")
        if isinstance(seg["counts"], list):
            from pycocotools import mask as mask_utils

            h, w = seg["size"]
            seg = mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"]
        return {
            "size": [int(seg["size"][0]), int(seg["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        }
    if isinstance(seg, list) and all(isinstance(p, list) for p in seg):
        polys = [[float(v) for v in p] for p in seg]
        if any(len(p) < 6 or len(p) % 2 for p in polys):
            raise DatasetFormatError(f"{where}: polygons need an even number >= 6 of values")
        return polys
    raise DatasetFormatError(f"{where}: segmentation is neither RLE nor a polygon list")


def segmentation_area(seg: Segmentation | None, height: int, width: int) -> float | None:
    """Pixel count of a mask (COCO `area`), None when there is no mask."""
    if seg is None:
        return None
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict):
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    return float(mask_utils.area(rle))


def coco_categories_for(dataset: Dataset) -> list[dict[str, Any]]:
    if dataset.is_taxonomy:
        return taxonomy.coco_categories()
    return [
        {"id": i + 1, "name": n, "supercategory": "cell"} for i, n in enumerate(dataset.categories)
    ]


def _int(entry: Mapping[str, Any], key: str, where: str) -> int:
    try:
        return int(entry[key])
    except (KeyError, TypeError, ValueError):
        raise DatasetFormatError(f"{where}: missing or non-integer {key!r}") from None


def read_coco(
    path: str | Path,
    *,
    taxonomy_categories: bool = True,
    class_map: Mapping[str, str | None] | None = None,
    drop_unknown: bool = False,
    check_images: bool = True,
) -> Dataset:
    """Read COCO instances JSON into a `Dataset` (root = the JSON's folder).

    With `taxonomy_categories`, category names must be taxonomy codes (after `class_map`;
    a name mapped to None is dropped and counted); unknown names raise DatasetFormatError
    listing the known codes, or are dropped and counted with `drop_unknown`. Without it the
    file's own category names are kept. Boxes are clipped to the image and empty boxes
    dropped (counted). With `check_images`, images missing on disk are dropped with their
    annotations (counted). The `LoadReport` is attached as `dataset.report` and logged.
    """
    path = Path(path)
    data = load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
        or not isinstance(data.get("categories"), list)
    ):
        raise DatasetFormatError(
            f"{path}: not COCO instances (needs lists 'images', 'annotations', 'categories')"
        )
    report = LoadReport(source=str(path))
    file_cats = {}
    for c in data["categories"]:
        file_cats[_int(c, "id", f"{path} category")] = str(c.get("name", ""))
    categories = taxonomy.CODES if taxonomy_categories else tuple(file_cats.values())
    cat_by_id: dict[int, str | None] = {}
    for cid, name in file_cats.items():
        try:
            cat_by_id[cid] = resolve_category(name, categories, class_map)
        except KeyError:
            if not drop_unknown:
                raise DatasetFormatError(
                    f"{path}: category {name!r} is not a taxonomy code; known: "
                    f"{', '.join(taxonomy.CODES)} (pass class_map, drop_unknown=True, or "
                    "taxonomy_categories=False)"
                ) from None
            cat_by_id[cid] = None

    images: list[ImageRecord] = []
    for i, im in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        if "file_name" not in im:
            raise DatasetFormatError(f"{where}: missing 'file_name'")
        rec = ImageRecord(
            id=_int(im, "id", where),
            file_name=str(im["file_name"]),
            width=_int(im, "width", where),
            height=_int(im, "height", where),
            case_id=im.get("case_id"),
            patient_id=im.get("patient_id"),
            um_per_px=None if im.get("um_per_px") is None else float(im["um_per_px"]),
            extra={k: v for k, v in im.items() if k not in _IMAGE_KEYS},
        )
        if check_images and not (path.parent / rec.file_name).is_file():
            report.missing_images += 1
            continue
        images.append(rec)
    by_id = {im.id: im for im in images}
    all_ids = {_int(im, "id", f"{path} images") for im in data["images"]}
    if len(all_ids) != len(data["images"]):
        raise DatasetFormatError(f"{path}: duplicate image ids")

    annotations: list[Annotation] = []
    for i, a in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        image_id = _int(a, "image_id", where)
        if image_id not in all_ids:
            raise DatasetFormatError(f"{where}: image_id {image_id} is not in 'images'")
        if image_id not in by_id:
            continue  # its image is missing on disk, already counted
        cid = _int(a, "category_id", where)
        if cid not in cat_by_id:
            raise DatasetFormatError(f"{where}: category_id {cid} is not in 'categories'")
        category = cat_by_id[cid]
        if category is None:
            report.unknown_categories[file_cats[cid]] += 1
            continue
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise DatasetFormatError(f"{where}: bbox must be [x, y, w, h]")
        im = by_id[image_id]
        x, y, w, h = (float(v) for v in box)
        clipped_box, clipped = clip_box(x, y, x + w, y + h, im.width, im.height)
        if clipped_box is None:
            report.dropped_empty_boxes += 1
            continue
        report.clipped_boxes += clipped
        annotations.append(
            Annotation(
                id=_int(a, "id", where),
                image_id=image_id,
                category=category,
                bbox=clipped_box,
                segmentation=normalise_segmentation(a.get("segmentation"), where),
                nucleus_segmentation=normalise_segmentation(a.get("nucleus_segmentation"), where),
                attributes={str(k): bool(v) for k, v in (a.get("attributes") or {}).items()},
                score=None if a.get("score") is None else float(a["score"]),
                iscrowd=bool(a.get("iscrowd", 0)),
                extra={k: v for k, v in a.items() if k not in _ANN_KEYS},
            )
        )
    report.images, report.annotations = len(images), len(annotations)
    report.log()
    return Dataset(
        images=images,
        annotations=annotations,
        categories=tuple(categories),
        root=path.parent,
        info=dict(data.get("info") or {}),
        report=report,
    )


def to_coco_dict(dataset: Dataset) -> dict[str, Any]:
    """The COCO instances dict (contract layout) for `dataset`."""
    by_id = {im.id: im for im in dataset.images}
    images = []
    for im in dataset.images:
        entry: dict[str, Any] = {
            "id": im.id,
            "file_name": im.file_name,
            "width": im.width,
            "height": im.height,
        }
        for key in ("case_id", "patient_id", "um_per_px"):
            if getattr(im, key) is not None:
                entry[key] = getattr(im, key)
        entry.update(im.extra)
        images.append(entry)
    annotations = []
    for a in dataset.annotations:
        if a.image_id not in by_id:
            raise ValueError(f"annotation {a.id} refers to unknown image {a.image_id}")
        im = by_id[a.image_id]
        area = segmentation_area(a.segmentation, im.height, im.width)
        entry = {
            "id": a.id,
            "image_id": a.image_id,
            "category_id": dataset.category_id(a.category),
            "bbox": list(a.bbox),
            "area": a.bbox[2] * a.bbox[3] if area is None else area,
            "iscrowd": int(a.iscrowd),
            "segmentation": [] if a.segmentation is None else a.segmentation,
        }
        if a.nucleus_segmentation is not None:
            entry["nucleus_segmentation"] = a.nucleus_segmentation
        entry["attributes"] = dict(a.attributes)
        if a.score is not None:
            entry["score"] = a.score
        entry.update(a.extra)
        annotations.append(entry)
    return {
        "info": dict(dataset.info),
        "images": images,
        "annotations": annotations,
        "categories": coco_categories_for(dataset),
    }


def write_coco(dataset: Dataset, path: str | Path) -> Path:
    """Write `dataset` as COCO instances JSON. File names are written as stored: keep them
    relative to the folder of `path` so that `read_coco(path)` finds the images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = to_coco_dict(dataset)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(path)
    return path
