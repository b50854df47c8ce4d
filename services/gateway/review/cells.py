"""A case's cells as the reviewer sees them: the model's detections with the reviewer's
labels laid over them, the cells the reviewer drew, and what the reviewer excluded.

The model's result is never changed. The review row (`db.CaseReview`) holds, beside it:
- `labels_json`: cell id -> taxonomy code, the reviewer's label where it differs from the
  model's (or from the drawn cell's first label);
- `added_json`: the cells the detector missed, each `{id, image, box, code, by, at}`; their
  ids are `<image>.a<n>`, so they never collide with the model's `<image>.<index>`;
- `excluded_json`: whole images (`box` null: a field or slide region not fit to count) and
  regions of an image (`box`: cells whose centre lies inside), each `{id, image, box, by, at}`.
- `complete_json`: the fields whose boxes the reviewer declared complete (every cell boxed,
  missed ones drawn, non-cells labelled ART), each `{image, by, at}`: what makes a field a
  detection target (`training.data.corrections`). The count does not read it.

The reviewed differential is computed from all of it by the pipeline's own function
(`marrowscope.features.differential_of_codes`), so the model's figure and the reviewer's
mean the same thing: excluded cells leave it, drawn cells join it, relabelled cells move.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from marrowscope.features import DifferentialEntry, differential_of_codes
from marrowscope.taxonomy import COUNTED_CODES

Box = tuple[float, float, float, float]
"""x1, y1, x2, y2 in pixels of the case image (x2 > x1, y2 > y1)."""

MIN_BOX_PX = 4.0
"""A drawn cell narrower or lower than this is a slip of the mouse, not a cell."""


@dataclass(frozen=True)
class AddedCell:
    """A cell the reviewer drew: the detector missed it."""

    id: str
    image: int
    box: Box
    code: str
    by: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "box": list(self.box),
            "code": self.code,
            "by": self.by,
            "at": self.at,
        }


@dataclass(frozen=True)
class Exclusion:
    """An image (`box` None) or a region of one that the reviewer left out of the count."""

    id: str
    image: int
    box: Box | None
    by: str
    at: float

    def covers(self, image: int, box: Box) -> bool:
        if image != self.image:
            return False
        if self.box is None:
            return True
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x1, y1, x2, y2 = self.box
        return x1 <= cx <= x2 and y1 <= cy <= y2

    def describe(self) -> str:
        if self.box is None:
            return f"image {self.image}"
        return f"image {self.image} region {_box_text(self.box)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "box": None if self.box is None else list(self.box),
            "by": self.by,
            "at": self.at,
        }


@dataclass(frozen=True)
class CompleteMark:
    """The reviewer's word that every cell of image `image` is boxed."""

    image: int
    by: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "by": self.by, "at": self.at}


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


@dataclass(frozen=True)
class CellView:
    id: str
    image: int
    box: Box
    model_code: str | None
    """The model's call; None for a drawn cell (and for a detection the typer did not type)."""
    confidence: float | None
    importance: float | None
    attention: float | None
    reviewed_code: str | None
    """The reviewer's label, None while the reviewer has not changed the model's call."""
    added: bool = False
    excluded: bool = False

    @property
    def code(self) -> str | None:
        return self.reviewed_code or self.model_code

    @property
    def counted(self) -> bool:
        return not self.excluded and self.code in COUNTED_CODES


def labels_from(text: str | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in json.loads(text or "{}").items()}


def added_from(text: str | None) -> list[AddedCell]:
    return [
        AddedCell(
            id=str(d["id"]),
            image=int(d["image"]),
            box=_as_box(d["box"]),
            code=str(d["code"]),
            by=str(d["by"]),
            at=float(d["at"]),
        )
        for d in json.loads(text or "[]")
    ]


def exclusions_from(text: str | None) -> list[Exclusion]:
    return [
        Exclusion(
            id=str(d["id"]),
            image=int(d["image"]),
            box=None if d.get("box") is None else _as_box(d["box"]),
            by=str(d["by"]),
            at=float(d["at"]),
        )
        for d in json.loads(text or "[]")
    ]


def complete_from(text: str | None) -> list[CompleteMark]:
    return [
        CompleteMark(image=int(d["image"]), by=str(d["by"]), at=float(d["at"]))
        for d in json.loads(text or "[]")
    ]


def _as_box(values: Sequence[Any]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def cells_of(
    result: Mapping[str, Any],
    labels: Mapping[str, str],
    added: Sequence[AddedCell] = (),
    exclusions: Sequence[Exclusion] = (),
) -> list[CellView]:
    """Every cell of the case in image order: the model's, then the drawn ones of each
    image, with the reviewer's labels and exclusions applied."""

    def excluded(image: int, box: Box) -> bool:
        return any(x.covers(image, box) for x in exclusions)

    out = []
    for image in result.get("images", []):
        index = int(image["index"])
        for j, cell in enumerate(image.get("cells", [])):
            cell_id = f"{index}.{j}"
            model_code = cell.get("cell_type") or (
                "RBC" if cell.get("detector_label") == "RBC" else None
            )
            box = _as_box(cell["box"])
            out.append(
                CellView(
                    id=cell_id,
                    image=index,
                    box=box,
                    model_code=model_code,
                    confidence=cell.get("confidence"),
                    importance=cell.get("importance"),
                    attention=cell.get("attention"),
                    reviewed_code=labels.get(cell_id),
                    excluded=excluded(index, box),
                )
            )
        for a in added:
            if a.image == index:
                out.append(
                    CellView(
                        id=a.id,
                        image=index,
                        box=a.box,
                        model_code=None,
                        confidence=None,
                        importance=None,
                        attention=None,
                        reviewed_code=labels.get(a.id, a.code),
                        added=True,
                        excluded=excluded(index, a.box),
                    )
                )
    return out


def differential_of(cells: Iterable[CellView], *, reviewed: bool) -> dict[str, DifferentialEntry]:
    """The model's differential (its own detections and calls, nothing the reviewer did) or
    the reviewed one (the reviewer's labels, drawn cells in, excluded cells out)."""
    picked = (c.code if reviewed else c.model_code for c in cells if _in(c, reviewed))
    return differential_of_codes([c for c in picked if c])


def _in(cell: CellView, reviewed: bool) -> bool:
    return not cell.excluded if reviewed else not cell.added


def image_sizes(result: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """image index -> (width, height) in pixels."""
    return {int(im["index"]): (int(im["width"]), int(im["height"])) for im in result["images"]}


def checked_box(result: Mapping[str, Any], image: int, box: Sequence[float], *, what: str) -> Box:
    """`box` as a Box when it lies inside image `image` of the case and is not degenerate;
    ValueError with the reason otherwise (the caller turns it into a ReviewError)."""
    sizes = image_sizes(result)
    if image not in sizes:
        raise ValueError(f"no image {image} in this case (images: {sorted(sizes)})")
    if len(box) != 4:
        raise ValueError(f"a {what} needs four coordinates x1, y1, x2, y2")
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = sizes[image]
    if not all(v == v and abs(v) != float("inf") for v in (x1, y1, x2, y2)):
        raise ValueError(f"the {what}'s coordinates must be numbers")
    if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
        raise ValueError(
            f"the {what} {_box_text((x1, y1, x2, y2))} is smaller than {MIN_BOX_PX:.0f} px: "
            "draw it from one corner to the opposite one"
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(
            f"the {what} {_box_text((x1, y1, x2, y2))} is not inside image {image} "
            f"({width} x {height} px)"
        )
    return (x1, y1, x2, y2)


def next_id(prefix: str, taken: Iterable[str]) -> int:
    """The next free number after `prefix` (ids are never reused, even after removal)."""
    numbers = [int(t.rsplit(prefix, 1)[1]) for t in taken if prefix in t]
    return max(numbers, default=0) + 1
