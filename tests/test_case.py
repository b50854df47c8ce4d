"""marrowscope.case with scripted model calls: which detections are typed, the calls, the
summary, and running in-process analyses without an event loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from marrowscope import case
from marrowscope.errors import InvalidInput
from marrowscope.features import MORPH_SUMMARY_FEATURES, case_feature_names
from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES

NAMES = (*CODES, *ATTRIBUTE_CODES)


class Scripted:
    """Three detections per image (BLA, RBC, LYT); the typer calls every crop a blast."""

    crop_size = 8
    crop_pad_fraction = 0.0

    def __init__(self, names=NAMES, wait: bool = False) -> None:
        self.names = names
        self.wait = wait
        self.typed: list[int] = []
        self.measured: list[list] = []
        self.crops: list[np.ndarray] = []

    async def detect(self, image: case.SmearImage) -> case.MeasuredDetections:
        if self.wait:
            await asyncio.sleep(0)
        boxes = np.array([[0, 0, 8, 8], [8, 8, 16, 16], [4, 4, 12, 12]], np.float32)
        det = case.Detections(boxes, np.array([0.9, 0.8, 0.7], np.float32), ("BLA", "RBC", "LYT"))
        morph = np.full((3, len(MORPH_SUMMARY_FEATURES)), 2.0, np.float32)
        unit = "px" if image.um_per_px is None else "um"
        return case.MeasuredDetections(det, morph, MORPH_SUMMARY_FEATURES, unit)

    async def measure(self, image: case.SmearImage, boxes: np.ndarray) -> case.MeasuredDetections:
        self.measured.append(boxes.tolist())
        n = len(boxes)
        det = case.Detections(boxes, np.ones(n, np.float32), (case.SINGLE_CELL_LABEL,) * n)
        morph = np.full((n, len(MORPH_SUMMARY_FEATURES)), 3.0, np.float32)
        return case.MeasuredDetections(det, morph, MORPH_SUMMARY_FEATURES, "um")

    async def type_cells(self, crops: np.ndarray) -> case.CellTypes:
        assert crops.shape[1:] == (8, 8, 3) and crops.dtype == np.uint8
        self.crops.append(crops)
        self.typed.append(len(crops))
        probs = np.full((len(crops), len(self.names)), 0.01, np.float32)
        probs[:, self.names.index("BLA")] = 0.9
        return case.CellTypes(probs, tuple(self.names))


def _images(n: int = 2) -> list[case.SmearImage]:
    return [case.SmearImage(np.zeros((16, 16, 3), np.uint8), 0.3) for _ in range(n)]


def test_red_cells_are_measured_not_typed_and_the_case_is_summarised():
    models = Scripted()
    result = case.run_now(case.analyse_case(models, _images()))
    assert models.typed == [2, 2]  # BLA and LYT of each image, not the RBC
    assert [im.cell_types for im in result.images] == [("BLA", None, "BLA")] * 2
    assert (result.n_detected, result.n_counted, len(result.cells)) == (6, 4, 4)
    assert result.feature_names == case_feature_names()
    named = result.named_features()
    assert named["frac_BLA"] == 1.0 and named["mean_cell_area"] == 2.0
    assert result.differential["BLA"].count == 4
    assert result.attribute_fractions() == pytest.approx(dict.fromkeys(ATTRIBUTE_CODES, 0.01))
    assert result.morphometric_summary()["cell_area"] == (2.0, 0.0)
    assert {im.length_unit for im in result.images} == {"um"}


def test_a_typer_without_a_needed_output_is_refused():
    names = tuple(n for n in NAMES if n != ATTRIBUTE_CODES[0])
    with pytest.raises(InvalidInput, match=ATTRIBUTE_CODES[0]):
        case.run_now(case.analyse_case(Scripted(names), _images(1)))


def test_a_case_needs_an_image():
    with pytest.raises(InvalidInput, match="at least one image"):
        case.run_now(case.analyse_case(Scripted(), []))


def test_run_now_works_inside_a_running_loop_and_refuses_waiting_calls():
    async def inside() -> int:
        return case.run_now(case.analyse_case(Scripted(), _images(1))).n_counted

    assert asyncio.run(inside()) == 2
    with pytest.raises(RuntimeError, match="never wait"):
        case.run_now(case.analyse_case(Scripted(wait=True), _images(1)))
    waited = asyncio.run(case.analyse_case(Scripted(wait=True), _images(1)))
    assert waited.n_counted == 2


def test_single_cell_images_are_measured_whole_and_typed_from_the_whole_image():
    from marrowscope.imaging import resize_for_model
    from marrowscope.taxonomy import NON_NUCLEATED_DETECTOR_LABELS

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((20, 24), (30, 18))]
    models = Scripted()
    images = [case.SmearImage(p, 0.3) for p in pixels]
    result = case.run_now(case.analyse_case(models, images, cells=True))
    assert models.measured == [[[0, 0, 24, 20]], [[0, 0, 18, 30]]]
    assert models.typed == [2]  # the crops of every image in one call
    (crops,) = models.crops
    for crop, p in zip(crops, pixels, strict=True):  # the whole image, no context padding
        np.testing.assert_array_equal(crop, resize_for_model(p, (8, 8)))
    assert [im.cell_types for im in result.images] == [("BLA",), ("BLA",)]
    assert case.SINGLE_CELL_LABEL not in NON_NUCLEATED_DETECTOR_LABELS
    assert (result.n_detected, result.n_counted) == (2, 2)
    assert result.named_features()["mean_cell_area"] == 3.0
    one = case.run_now(case.analyse_cell_image(models, images[0]))
    assert one.detections.labels == (case.SINGLE_CELL_LABEL,) and len(one.cells) == 1


def test_single_cell_answers_that_do_not_fit_are_refused():
    class TwoBoxes(Scripted):
        async def measure(self, image, boxes):
            return await super().measure(image, np.concatenate([boxes, boxes]))

    with pytest.raises(InvalidInput, match="2 detections"):
        case.run_now(case.analyse_cell_image(TwoBoxes(), _images(1)[0]))
    found = case.run_now(case.measure_cell_image(Scripted(), _images(1)[0]))
    types = case.CellTypes(np.zeros((2, len(NAMES)), np.float32), NAMES)
    with pytest.raises(InvalidInput, match="2 rows for 1"):
        case.call_cell_images([found], types)
