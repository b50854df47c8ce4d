"""Batched morphometrics (`marrowscope.morphometrics_batch`) give the per-cell features:
same masks, same features within the module's documented tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope import morphometrics_batch as mb
from marrowscope.morphometrics import FEATURE_NAMES, measure_cells
from tests.test_morphometrics import drawn_cell

EXACT = [
    "cell_area",
    "nucleus_area",
    "cytoplasm_area",
    "cell_perimeter",
    "nucleus_perimeter",
    "nc_ratio",
    "nucleus_fraction",
    "segmentation_ok",
]
SOLIDITY = ["cell_solidity", "nucleus_solidity"]


def assert_same_features(batched: np.ndarray, per_cell: np.ndarray) -> None:
    assert batched.shape == per_cell.shape and batched.dtype == np.float32
    for k, name in enumerate(FEATURE_NAMES):
        if name in EXACT:
            tol = {"rtol": 1e-6, "atol": 0.0}
        elif name in SOLIDITY:
            tol = {"rtol": 0.0, "atol": mb.SOLIDITY_ATOL}
        else:
            tol = {"rtol": 0.0, "atol": mb.ATOL}
        np.testing.assert_allclose(batched[:, k], per_cell[:, k], err_msg=name, **tol)


def field_of_cells(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 200x300 field of drawn cells of different sizes and shapes, and their boxes."""
    image = np.empty((200, 300, 3), np.uint8)
    image[:] = (235, 225, 200)
    boxes = []
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = int(rng.integers(40, 90))
        r = size // 3
        crop, _, _ = drawn_cell(size, (r, int(r * 0.8)), (r // 2, int(r * 0.7)), 20.0 * i, i)
        y, x = (i // 3) * 100, (i % 3) * 100
        image[y : y + size, x : x + size] = crop
        c = size / 2
        boxes.append([x + c - r - 2, y + c - r - 2, x + c + r + 2, y + c + r + 2])
    return image, np.array(boxes)


def test_classical_split_gives_the_per_cell_features() -> None:
    image, boxes = field_of_cells()
    per_cell = measure_cells(image, boxes, um_per_px=0.25)
    batched = measure_cells(image, boxes, um_per_px=0.25, batched=True)
    assert per_cell[:, -1].all()
    assert_same_features(batched, per_cell)


def test_drawn_cell_geometry_through_the_batch() -> None:
    crop, cell, nucleus = drawn_cell()
    (row,) = mb.mask_features([crop], [(cell, nucleus)])
    f = dict(zip(FEATURE_NAMES, row, strict=True))
    assert f["cell_area"] == cell.sum() and f["nucleus_area"] == nucleus.sum()
    assert f["nucleus_eccentricity"] == pytest.approx(0.8, abs=0.03)
    assert f["nucleus_solidity"] > 0.95 and f["segmentation_ok"] == 1.0


class HalfSplitter:
    """A stand-in learned split: the cell is a disc at the centre, the nucleus its left part;
    an empty cell for every third crop."""

    name, version, device = "learned", "test", "cpu"

    def split(self, crops, centres=None):
        out = []
        for k, crop in enumerate(crops):
            h, w = crop.shape[:2]
            yy, xx = np.mgrid[:h, :w]
            cell = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 3) ** 2
            if k % 3 == 2:
                cell[:] = False
            out.append((cell, cell & (xx < w / 2)))
        return out


def test_learned_split_gives_the_per_cell_features() -> None:
    image, boxes = field_of_cells()
    per_cell = measure_cells(image, boxes, splitter=HalfSplitter())
    batched = measure_cells(image, boxes, splitter=HalfSplitter(), batched=True)
    assert per_cell[:, -1].tolist() == [1, 1, 0, 1, 1, 0]
    assert_same_features(batched, per_cell)


def test_small_chunks_and_degenerate_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    image, boxes = field_of_cells()
    boxes = np.concatenate([boxes, [[5, 5, 6, 6], [299, 199, 400, 300]]])  # empty windows
    per_cell = measure_cells(image, boxes)
    monkeypatch.setattr(mb, "CHUNK_PIXELS", 2 * 90 * 90)  # about two crops per chunk
    batched = measure_cells(image, boxes, batched=True)
    assert not batched[-2:].any()
    assert_same_features(batched, per_cell)


def test_no_boxes_and_blank_crops() -> None:
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert measure_cells(blank, np.zeros((0, 4)), batched=True).shape == (0, len(FEATURE_NAMES))
    rows = measure_cells(blank, np.array([[10.0, 10.0, 40.0, 40.0]]), batched=True)
    assert not rows.any()
