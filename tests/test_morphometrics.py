"""Morphometrics on drawn cells with known geometry, unit scaling and degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marrowscope.errors import InvalidInput
from marrowscope.morphometrics import FEATURE_NAMES, measure_cell, measure_cells

BACKGROUND = (235, 225, 200)  # pale yellowish smear background
CYTOPLASM = (205, 160, 150)  # pinkish-grey
NUCLEUS = (95, 50, 130)  # dark purple


def ellipse(shape, cy, cx, ry, rx, angle_deg=0.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    a = math.radians(angle_deg)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def drawn_cell(size=120, cell_r=(40, 40), nuc_r=(18, 30), angle=30.0, seed=0):
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUND
    cell = ellipse((size, size), size / 2, size / 2, *cell_r)
    nucleus = ellipse((size, size), size / 2, size / 2, *nuc_r, angle_deg=angle) & cell
    img[cell] = CYTOPLASM
    img[nucleus] = NUCLEUS
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), cell, nucleus


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_drawn_cell_geometry_is_recovered():
    crop, cell, nucleus = drawn_cell()
    m = measure_cell(crop)
    f = m.features
    assert f["segmentation_ok"] == 1.0
    assert dice(m.cell_mask, cell) > 0.97 and dice(m.nucleus_mask, nucleus) > 0.95
    assert f["cell_area"] == pytest.approx(math.pi * 40 * 40, rel=0.05)
    assert f["nucleus_area"] == pytest.approx(math.pi * 18 * 30, rel=0.05)
    # ellipse semi-axes 30 and 18: e = sqrt(1 - (18/30)^2) = 0.8
    assert f["nucleus_eccentricity"] == pytest.approx(0.8, abs=0.03)
    assert f["cell_eccentricity"] < 0.15
    true_nc = (18 * 30) / (40 * 40 - 18 * 30)
    assert f["nc_ratio"] == pytest.approx(true_nc, rel=0.08)
    assert f["nucleus_fraction"] == pytest.approx(18 * 30 / (40 * 40), rel=0.05)
    assert f["cell_perimeter"] == pytest.approx(2 * math.pi * 40, rel=0.08)
    assert f["nucleus_solidity"] > 0.95
    assert f["nucleus_mean_b"] > f["nucleus_mean_g"]  # purple
    assert f["cytoplasm_mean_r"] == pytest.approx(CYTOPLASM[0] / 255, abs=0.03)
    assert f["cell_colour_range"] > 0.2  # nucleus and cytoplasm differ a lot in luminance
    vec = m.as_vector()
    assert vec.dtype == np.float32 and vec.shape == (len(FEATURE_NAMES),)
    assert np.isfinite(vec).all()


def test_um_scaling_of_areas_and_lengths():
    crop, _, _ = drawn_cell()
    px = measure_cell(crop).features
    um = measure_cell(crop, um_per_px=0.25).features
    assert um["cell_area"] == pytest.approx(px["cell_area"] * 0.0625)
    assert um["nucleus_area"] == pytest.approx(px["nucleus_area"] * 0.0625)
    assert um["cell_perimeter"] == pytest.approx(px["cell_perimeter"] * 0.25)
    for unitless in ("nc_ratio", "nucleus_eccentricity", "nucleus_solidity", "nucleus_mean_b"):
        assert um[unitless] == pytest.approx(px[unitless])


def test_given_cell_mask_is_used_as_is():
    crop, cell, nucleus = drawn_cell()
    m = measure_cell(crop, cell_mask=cell)
    assert (m.cell_mask == cell).all()
    assert dice(m.nucleus_mask, nucleus) > 0.95


def test_lobulated_nucleus_has_low_solidity():
    size = 120
    crop, cell, _ = drawn_cell(nuc_r=(1, 1))
    lobes = (
        ellipse((size, size), 45, 45, 9, 9)
        | ellipse((size, size), 75, 45, 9, 9)
        | ellipse((size, size), 60, 78, 9, 9)
    )
    img = crop.copy()
    img[lobes] = NUCLEUS
    f = measure_cell(img).features
    assert f["nucleus_solidity"] < 0.6
    assert f["nucleus_area"] == pytest.approx(lobes.sum(), rel=0.08)


def test_neighbour_cell_is_excluded():
    crop, cell, _ = drawn_cell(size=120, cell_r=(30, 30), nuc_r=(12, 12))
    img = crop.copy()
    other = ellipse(crop.shape[:2], 10, 10, 15, 15)  # a second cell in the corner
    img[other] = CYTOPLASM
    m = measure_cell(img)
    assert not (m.cell_mask & other).any()
    assert dice(m.cell_mask, cell) > 0.95


@pytest.mark.parametrize(
    "crop",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.full((5, 5, 3), 200, np.uint8),
        np.full((64, 64, 3), 230, np.uint8),
        np.random.default_rng(0).integers(225, 235, (64, 64, 3)).astype(np.uint8),
    ],
    ids=["empty", "tiny", "blank", "noise"],
)
def test_degenerate_crops_give_flagged_defaults(crop):
    m = measure_cell(crop)
    assert m.features["segmentation_ok"] == 0.0
    assert not m.as_vector().any()
    assert m.cell_mask.shape == crop.shape[:2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop": np.zeros((10, 10), np.uint8)}, "H, W, 3"),
        ({"crop": np.zeros((10, 10, 3), np.float32)}, "uint8"),
        ({"crop": np.zeros((10, 10, 3), np.uint8), "cell_mask": np.ones((9, 10), bool)}, "shape"),
        ({"crop": np.zeros((10, 10, 3), np.uint8), "um_per_px": 0.0}, "um_per_px"),
        ({"crop": np.zeros((10, 10, 3), np.uint8), "um_per_px": float("nan")}, "um_per_px"),
    ],
)
def test_malformed_input_raises(kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        measure_cell(**kwargs)


def test_measure_cells_on_a_field_with_several_cells():
    field = np.empty((200, 300, 3), np.uint8)
    field[:] = BACKGROUND
    a, _, _ = drawn_cell(size=100, cell_r=(30, 30), nuc_r=(12, 20), seed=1)
    b, _, _ = drawn_cell(size=100, cell_r=(25, 25), nuc_r=(15, 15), seed=2)
    field[0:100, 0:100] = a
    field[90:190, 180:280] = b
    boxes = np.array(
        [[20, 20, 80, 80], [205, 115, 255, 165], [290, 190, 300, 200], [400, 400, 500, 500]],
        dtype=np.float32,
    )
    out = measure_cells(field, boxes, um_per_px=0.5)
    assert out.shape == (4, len(FEATURE_NAMES)) and out.dtype == np.float32
    ok = FEATURE_NAMES.index("segmentation_ok")
    area = FEATURE_NAMES.index("cell_area")
    assert out[:2, ok].tolist() == [1.0, 1.0] and out[2:, ok].tolist() == [0.0, 0.0]
    assert out[0, area] == pytest.approx(math.pi * 30 * 30 * 0.25, rel=0.06)
    assert out[1, area] == pytest.approx(math.pi * 25 * 25 * 0.25, rel=0.06)
    # same numbers as measuring the crop alone
    single = measure_cell(field[0:100, 0:100], um_per_px=0.5).features["cell_area"]
    assert out[0, area] == pytest.approx(single, rel=0.01)
    assert measure_cells(field, np.zeros((0, 4))).shape == (0, len(FEATURE_NAMES))
    with pytest.raises(InvalidInput, match="N, 4"):
        measure_cells(field, np.zeros((3, 5)))
    with pytest.raises(InvalidInput, match="NaN"):
        measure_cells(field, np.array([[0, 0, np.nan, 10]]))


def test_first_measurements_from_many_threads_at_once_all_succeed():
    """A service with two model threads met scikit-image's lazy submodule import half done
    ("partially initialized module 'skimage.morphology'"); `preload` imports it once, under
    a lock. Fresh interpreter, 8 threads released together into their first measurement."""
    import subprocess
    import sys
    import textwrap

    from marrowscope.paths import PROJECT_ROOT

    code = textwrap.dedent(
        """
        import threading
        import numpy as np
        from marrowscope.morphometrics import measure_cells

        image = np.full((96, 96, 3), 235, np.uint8)
        image[30:66, 30:66] = (190, 170, 200)
        image[40:56, 40:56] = (110, 50, 150)
        boxes = np.array([[28, 28, 68, 68]], np.float32)
        gate, errors = threading.Barrier(8), []

        def run():
            gate.wait()
            try:
                assert measure_cells(image, boxes).shape[0] == 1
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
