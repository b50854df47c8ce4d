"""The cell analysis of one case, written once for serving and training.

Which detections count, how they are cropped and typed, the per-cell calls, the
differential and the case feature vector (the ensemble's input) live here. The model calls
come in through `CellModels`: the gateway passes its model services
(`services.gateway.calls.ServedCellModels`, gRPC), training, benchmarks and notebooks the
in-process predictors (`marrowscope.inference.InProcessModels`). Both therefore compute
the case vector the ensemble learned from with the same code.

Per image (`analyse_image` = `CellModels.detect`, then `analyse_detections`):

1. detect: boxes, scores and detector labels of every detection, with its morphometrics
   (`MeasuredDetections`; lengths in um when the image has a pixel size, else px);
2. which count: every detection except the non-nucleated detector labels
   (`taxonomy.NON_NUCLEATED_DETECTOR_LABELS`: red cells, platelets) is typed; those stay
   in the image's detections (a report draws them) but are never typed;
3. crop: square crops at the typer's crop size with its context padding
   (`imaging.crop_cells`, as training cut them);
4. type: probabilities per cell code and attribute (`CellModels.type_cells`), and with
   `embeddings` each typed cell's penultimate celltype embedding float32[D] (what a MIL
   model reads: `ImageAnalysis.embeddings`, `CaseAnalysis.embeddings`);
5. call: one `features.CellCall` per typed detection (argmax type, attribute
   probabilities, morphometrics); a typer without a code or attribute the case features
   need is refused (`InvalidInput`).

Per single-cell image (`analyse_cell_image`; a CellaVision-type export holds one cell per
image): no detection. The image is one detection, its whole area (`whole_image_box`,
labelled `SINGLE_CELL_LABEL`), measured by `CellModels.measure`; the typer's crop is the
whole image resized to the crop size (`single_cell_crop`: `imaging.resize_for_model`, no
context padding, exactly as `training.data.singlecell.load_crops` prepared real single-cell
crops for the typer). `analyse_cell_images` types the crops of many images in one
`type_cells` call (`call_cell_images` then makes one `ImageAnalysis` per image).

Per case (`summarise`): the differential with Wilson intervals and the case vector of all
typed cells (`marrowscope.features`). `analyse_case` runs both over a list of images.

Async because served calls wait on the network; in-process calls answer at once.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np

from marrowscope.errors import InvalidInput
from marrowscope.taxonomy import NON_NUCLEATED_DETECTOR_LABELS

if TYPE_CHECKING:
    from marrowscope.features import CellCall, DifferentialEntry

LengthUnit = Literal["um", "px"]
T = TypeVar("T")
SINGLE_CELL_LABEL = "cell"
"""Detector label of the one detection of a single-cell image: nucleated (not in
`taxonomy.NON_NUCLEATED_DETECTOR_LABELS`), so it is typed and counted."""


@dataclass(frozen=True)
class Detections:
    """Detections of one image: boxes float32[N, 4] (x1, y1, x2, y2 pixels), scores
    float32[N] in [0, 1] (descending), labels: N class names from the detector config."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray | Sequence[int]) -> Detections:
        keep = np.asarray(keep, dtype=np.int64)
        return Detections(self.boxes[keep], self.scores[keep], tuple(self.labels[i] for i in keep))


@dataclass(frozen=True, eq=False)
class SmearImage:
    """One image of a case.

    pixels: uint8[H, W, 3] RGB, the pixels cells are cropped from; um_per_px: micrometres
    per pixel (None: morphometrics in px); encoded: the file as submitted (PNG/JPEG/TIFF)
    when there is one, which a served detector is sent instead of re-encoded pixels.
    """

    pixels: np.ndarray
    um_per_px: float | None = None
    encoded: bytes | None = None


@dataclass(frozen=True, eq=False)
class MeasuredDetections:
    """What `CellModels.detect` finds on one image: the detections, their morphometrics
    float32[N, F] named by `morphometric_names`, and the unit of those lengths."""

    detections: Detections
    morphometrics: np.ndarray
    morphometric_names: tuple[str, ...]
    length_unit: LengthUnit


@dataclass(frozen=True, eq=False)
class CellTypes:
    """probs float32[B, K] in [0, 1], columns named by `names` (cell codes, then
    attribute codes); embeddings float32[B, D], the typer's penultimate embedding per crop,
    only when asked for (`type_cells(..., embeddings=True)`), else None."""

    probs: np.ndarray
    names: tuple[str, ...]
    embeddings: np.ndarray | None = None


class CellModels(Protocol):
    """The model calls of a case analysis."""

    @property
    def crop_size(self) -> int:
        """Side S of the square crops the typer takes (px)."""
        ...

    @property
    def crop_pad_fraction(self) -> float:
        """Context around each box in the crops, as a fraction of the box side."""
        ...

    async def detect(self, image: SmearImage) -> MeasuredDetections:
        """Every detection of the image with its morphometrics at `image.um_per_px`."""
        ...

    async def measure(self, image: SmearImage, boxes: np.ndarray) -> MeasuredDetections:
        """No detection: exactly `boxes` float32[N, 4] (x1, y1, x2, y2 pixels inside the
        image), in that order, with scores 1.0, labels `SINGLE_CELL_LABEL` and their
        morphometrics at `image.um_per_px`."""
        ...

    async def type_cells(self, crops: np.ndarray, *, embeddings: bool = False) -> CellTypes:
        """crops uint8[B, S, S, 3] RGB -> probabilities of every code and attribute; with
        `embeddings`, also each crop's penultimate embedding (`CellTypes.embeddings`)."""
        ...


@dataclass(frozen=True, eq=False)
class ImageAnalysis:
    """One image of a case: every detection, the morphometrics of each (float32[N, F] named
    by `morphometric_names`), and `calls` (one per detection, None for detections not sent
    to the cell typer, e.g. red cells)."""

    detections: Detections
    morphometrics: np.ndarray
    morphometric_names: tuple[str, ...]
    calls: tuple[CellCall | None, ...]
    length_unit: LengthUnit
    embeddings: np.ndarray | None = None
    """float32[n_typed, D]: the typed detections' embeddings in detection order (the rows of
    `cells`), when the analysis asked for them; else None."""

    @property
    def cell_types(self) -> tuple[str | None, ...]:
        """The type code per detection (None: not typed)."""
        return tuple(None if c is None else c.cell_type for c in self.calls)

    @property
    def cells(self) -> list[CellCall]:
        """The typed detections' calls, in detection order."""
        return [c for c in self.calls if c is not None]

    @property
    def n_counted(self) -> int:
        """Typed cells of a counted code (red cells a typer calls RBC are not)."""
        from marrowscope.taxonomy import COUNTED_CODES

        return sum(code in COUNTED_CODES for code in self.cell_types)


@dataclass(frozen=True, eq=False)
class CaseAnalysis:
    images: list[ImageAnalysis]
    cells: list[CellCall]
    """Every typed cell (red-cell-typed ones included; `case_features` leaves them out)."""
    feature_names: tuple[str, ...]
    features: np.ndarray
    """float32[F], `marrowscope.features.case_features` of `cells`."""
    differential: dict[str, DifferentialEntry]

    @property
    def embeddings(self) -> np.ndarray | None:
        """float32[len(cells), D]: every typed cell's embedding, in `cells` order (images in
        order, then detection order); None unless every image carries them."""
        parts = [im.embeddings for im in self.images]
        if not parts or any(p is None for p in parts):
            return None
        rows = [p for p in parts if p is not None and len(p)]  # an image may type no cell
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(rows).astype(np.float32, copy=False)

    @property
    def n_detected(self) -> int:
        return sum(len(im.detections) for im in self.images)

    @property
    def n_counted(self) -> int:
        """Typed cells of a counted code (what the differential counts)."""
        return sum(im.n_counted for im in self.images)

    def named_features(self) -> dict[str, float]:
        return dict(zip(self.feature_names, (float(v) for v in self.features), strict=True))

    def attribute_fractions(self) -> dict[str, float]:
        """Attribute -> its mean probability over the counted blasts (`frac_attr_*`)."""
        return {
            k.removeprefix("frac_attr_"): v
            for k, v in self.named_features().items()
            if k.startswith("frac_attr_")
        }

    def morphometric_summary(self) -> dict[str, tuple[float, float]]:
        """Morphometric feature -> (mean, population std) over the counted cells."""
        named = self.named_features()
        return {
            k.removeprefix("mean_"): (v, named.get("std_" + k.removeprefix("mean_"), 0.0))
            for k, v in named.items()
            if k.startswith("mean_")
        }


def typed_detections(labels: Sequence[str]) -> list[int]:
    """Indexes of the detections the cell typer sees: all but the non-nucleated detector
    labels (red cells, platelets), which are measured but never typed."""
    return [i for i, lab in enumerate(labels) if lab not in NON_NUCLEATED_DETECTOR_LABELS]


def cell_calls(
    probs: np.ndarray, names: Sequence[str], morph: np.ndarray, morph_names: Sequence[str]
) -> list[CellCall]:
    """`CellCall`s from celltype probabilities float[N, K] (`names`) and morphometrics
    float[N, F] (`morph_names`). Raises InvalidInput when the cell typer lacks a taxonomy
    code or attribute the case features need."""
    from marrowscope.features import CellCall
    from marrowscope.taxonomy import ATTRIBUTE_CODES, COUNTED_CODES

    missing = [c for c in (*COUNTED_CODES, *ATTRIBUTE_CODES) if c not in names]
    if missing:
        raise InvalidInput(f"celltype outputs lack {missing}, which the case features need")
    if len(probs) != len(morph):
        raise InvalidInput(f"{len(probs)} probability rows but {len(morph)} morphometric rows")
    return [
        CellCall(
            probs={n: float(p) for n, p in zip(names, row, strict=True)},
            morph={n: float(v) for n, v in zip(morph_names, m, strict=True)},
        )
        for row, m in zip(probs, morph, strict=True)
    ]


def _check_embeddings(types: CellTypes, rows: int) -> np.ndarray:
    if types.embeddings is None:
        raise InvalidInput("cell typer answered no embeddings, which were asked for")
    emb = np.asarray(types.embeddings, np.float32)
    if emb.ndim != 2 or emb.shape[0] != rows:
        raise InvalidInput(f"cell typer answered embeddings {list(emb.shape)} for {rows} crops")
    return emb


async def analyse_detections(
    models: CellModels, image: SmearImage, found: MeasuredDetections, *, embeddings: bool = False
) -> ImageAnalysis:
    """Steps 2-5 of the module doc for one image whose detections are `found` (with
    `embeddings`, the typed cells' embeddings too)."""
    from marrowscope.imaging import crop_cells

    det = found.detections
    typed = typed_detections(det.labels)
    calls: list[CellCall | None] = [None] * len(det)
    emb: np.ndarray | None = np.zeros((0, 0), np.float32) if embeddings else None
    if typed:
        crops = crop_cells(
            image.pixels, det.boxes[typed], models.crop_size, models.crop_pad_fraction
        )
        types = await (
            models.type_cells(crops, embeddings=True) if embeddings else models.type_cells(crops)
        )
        if types.probs.shape[0] != len(typed):
            raise InvalidInput(f"cell typer answered {types.probs.shape[0]} rows for {len(typed)}")
        if embeddings:
            emb = _check_embeddings(types, len(typed))
        typed_calls = cell_calls(
            types.probs, types.names, found.morphometrics[typed], found.morphometric_names
        )
        for i, call in zip(typed, typed_calls, strict=True):
            calls[i] = call
    return ImageAnalysis(
        det, found.morphometrics, found.morphometric_names, tuple(calls), found.length_unit, emb
    )


async def analyse_image(
    models: CellModels, image: SmearImage, *, embeddings: bool = False
) -> ImageAnalysis:
    """Detect, measure, crop, type and call the cells of one image."""
    return await analyse_detections(
        models, image, await models.detect(image), embeddings=embeddings
    )


def whole_image_box(pixels: np.ndarray) -> np.ndarray:
    """float32[1, 4]: the box (0, 0, W, H) of an image uint8[H, W, 3]."""
    h, w = pixels.shape[:2]
    return np.array([[0.0, 0.0, float(w), float(h)]], np.float32)


CROP_MODES = ("image", "cell_box")
"""How a typer's input is cut from a single-cell image (model config `crop_mode`):
`image`, the whole image resized to the crop size (the cell at the scale its scanner gave
it); `cell_box`, the box of the central cell's classical mask with the serving context
(`crop_cells`, CELL_CROP_PAD_FRACTION), as fields' detections are cut: the cell fills the
same share of the crop whatever its scanner's pixel size."""


def central_cell_box(pixels: np.ndarray) -> np.ndarray:
    """float32[1, 4]: the box of the cell at the centre of a single-cell image (classical
    segmentation, `measure_cell`); the whole image when no cell is found there."""
    from marrowscope.morphometrics import measure_cell

    mask = measure_cell(pixels).cell_mask
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return whole_image_box(pixels)
    return np.array(
        [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]], np.float32
    )


def single_cell_crop(pixels: np.ndarray, crop_size: int, crop_mode: str = "image") -> np.ndarray:
    """uint8[S, S, 3]: a single-cell image cut for a typer of `crop_mode` (CROP_MODES):
    resized whole (no context padding: the image is already a crop around its cell), or the
    central cell's box with the serving context."""
    from marrowscope.imaging import crop_cells, resize_for_model

    if crop_mode == "image":
        return resize_for_model(pixels, (crop_size, crop_size))
    if crop_mode == "cell_box":
        crop: np.ndarray = crop_cells(pixels, central_cell_box(pixels), crop_size)[0]
        return crop
    raise InvalidInput(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")


async def measure_cell_image(models: CellModels, image: SmearImage) -> MeasuredDetections:
    """The one detection of a single-cell image (its whole area) with its morphometrics."""
    found = await models.measure(image, whole_image_box(image.pixels))
    if len(found.detections) != 1 or len(found.morphometrics) != 1:
        raise InvalidInput(
            f"measuring one box answered {len(found.detections)} detections and "
            f"{len(found.morphometrics)} morphometric rows"
        )
    return found


def call_cell_images(found: Sequence[MeasuredDetections], types: CellTypes) -> list[ImageAnalysis]:
    """One `ImageAnalysis` per single-cell image: its one detection (`found[k]`) called from
    row k of `types` (with its embedding row when `types` has embeddings). Raises
    InvalidInput when the rows do not match the images."""
    if types.probs.shape[0] != len(found):
        raise InvalidInput(f"cell typer answered {types.probs.shape[0]} rows for {len(found)}")
    emb = None if types.embeddings is None else _check_embeddings(types, len(found))
    out = []
    for k, f in enumerate(found):
        (call,) = cell_calls(
            types.probs[k : k + 1], types.names, f.morphometrics, f.morphometric_names
        )
        out.append(
            ImageAnalysis(
                f.detections,
                f.morphometrics,
                f.morphometric_names,
                (call,),
                f.length_unit,
                None if emb is None else emb[k : k + 1],
            )
        )
    return out


async def analyse_cell_images(
    models: CellModels, images: Sequence[SmearImage], *, embeddings: bool = False
) -> list[ImageAnalysis]:
    """Measure each single-cell image, type all their crops in one `type_cells` call."""
    if not images:
        return []
    found = [await measure_cell_image(models, image) for image in images]
    crops = np.stack([single_cell_crop(image.pixels, models.crop_size) for image in images])
    if embeddings:
        types = await models.type_cells(crops, embeddings=True)
        _check_embeddings(types, len(images))
        return call_cell_images(found, types)
    return call_cell_images(found, await models.type_cells(crops))


async def analyse_cell_image(models: CellModels, image: SmearImage) -> ImageAnalysis:
    """Measure, crop, type and call the one cell of a single-cell image."""
    (analysis,) = await analyse_cell_images(models, [image])
    return analysis


def summarise(images: Sequence[ImageAnalysis]) -> CaseAnalysis:
    """The differential and the case vector over the typed cells of every image.

    Raises InvalidInput when a cell lacks a probability or summary feature, or holds a
    value the case features refuse (`features.case_features`)."""
    from marrowscope.features import case_features, differential

    cells = [c for im in images for c in im.cells]
    names, vector = case_features(cells)
    return CaseAnalysis(list(images), cells, names, vector, differential(cells))


async def analyse_case(
    models: CellModels,
    images: Sequence[SmearImage],
    *,
    cells: bool = False,
    embeddings: bool = False,
) -> CaseAnalysis:
    """`analyse_image` over the images of one case (in order), then `summarise`; with
    `cells`, each image is one cell (`analyse_cell_images`); with `embeddings`, the typed
    cells' embeddings too (`CaseAnalysis.embeddings`)."""
    if not images:
        raise InvalidInput("a case needs at least one image")
    if cells:
        return summarise(await analyse_cell_images(models, images, embeddings=embeddings))
    return summarise(
        [await analyse_image(models, image, embeddings=embeddings) for image in images]
    )


def run_now(analysis: Coroutine[Any, Any, T]) -> T:
    """The result of a case-analysis coroutine whose model calls never wait (in-process
    predictors), without an event loop: so it runs the same inside a running loop (a
    notebook, a benchmark) as in a script. Raises RuntimeError when a call does wait."""
    try:
        analysis.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    analysis.close()
    raise RuntimeError("run_now needs model calls that never wait; await the analysis instead")
