"""How a single-cell image is cut for a typer (`marrowscope.case.single_cell_crop`, model
config `crop_mode`): the whole image resized, or the central cell's box with the serving
context. The second makes the cell fill the same share of the crop whatever the scanner's
pixel size, which is what it is for (issue 23, physical scale)."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope.case import CROP_MODES, central_cell_box, single_cell_crop
from marrowscope.errors import InvalidInput
from marrowscope.imaging import CELL_CROP_PAD_FRACTION
from marrowscope.models import ModelConfigError, make_config
from marrowscope.morphometrics import segment_cell


def _cell_image(um_per_px: float, side: int = 120, seed: int = 3) -> np.ndarray:
    """One lymphocyte drawn by the synthetic renderer at `um_per_px`, centred, on a light
    background: the same cell (same random draws) at another pixel size is the same cell
    seen by another scanner."""
    from training.data.synth_cells import Stain, draw_cell

    rng = np.random.default_rng(seed)
    sprite = draw_cell(rng, "LYT", side / 2, side / 2, um_per_px, Stain(0, 1))
    od = np.full((side, side, 3), 0.05, np.float32)
    ys, xs = sprite.alpha.shape
    y0, x0 = max(sprite.y0, 0), max(sprite.x0, 0)
    y1, x1 = min(sprite.y0 + ys, side), min(sprite.x0 + xs, side)
    a = sprite.alpha[y0 - sprite.y0 : y1 - sprite.y0, x0 - sprite.x0 : x1 - sprite.x0]
    region = (slice(y0, y1), slice(x0, x1))
    od[region] = (
        od[region] * (1 - a)[..., None]
        + sprite.od[y0 - sprite.y0 : y1 - sprite.y0, x0 - sprite.x0 : x1 - sprite.x0]
    )
    return np.clip(np.exp(-od) * 255.0, 0, 255).astype(np.uint8)


def _cell_fraction(crop: np.ndarray) -> float:
    """Equivalent diameter of the crop's central cell over the crop side."""
    area = float(segment_cell(crop).sum())
    return 2.0 * np.sqrt(area / np.pi) / crop.shape[0]


def test_cell_box_crops_hold_the_cell_at_one_scale_whatever_the_pixel_size():
    fine, coarse = _cell_image(0.25), _cell_image(0.35)  # the cell 1.4x larger on `fine`
    image_mode = [_cell_fraction(single_cell_crop(im, 64)) for im in (fine, coarse)]
    box_mode = [_cell_fraction(single_cell_crop(im, 64, "cell_box")) for im in (fine, coarse)]
    # resized whole, the cell keeps the scanner's scale: 1.4x apart
    assert image_mode[0] / image_mode[1] == pytest.approx(1.4, rel=0.1)
    # cut by its box, the cell fills the crop but for the context on each side
    assert box_mode[0] / box_mode[1] == pytest.approx(1.0, abs=0.06)
    for fraction in box_mode:
        assert fraction == pytest.approx(1 / (1 + 2 * CELL_CROP_PAD_FRACTION), abs=0.12)


def test_central_box_is_the_cell_not_the_image_and_blank_images_fall_back_to_the_image():
    image = _cell_image(0.3)
    x1, y1, x2, y2 = central_cell_box(image)[0]
    assert 0 < x1 < 60 < x2 < 120 and 0 < y1 < 60 < y2 < 120
    assert (x2 - x1) < 100 and (y2 - y1) < 100
    blank = np.full((50, 70, 3), 235, np.uint8)
    np.testing.assert_array_equal(central_cell_box(blank), [[0, 0, 70, 50]])
    assert single_cell_crop(blank, 32, "cell_box").shape == (32, 32, 3)


def test_unknown_modes_are_refused_in_the_crop_the_config_and_the_loader():
    image = _cell_image(0.3)
    assert CROP_MODES == ("image", "cell_box")
    with pytest.raises(InvalidInput, match="crop_mode"):
        single_cell_crop(image, 32, "nucleus")
    with pytest.raises(ModelConfigError, match="crop_mode"):
        make_config("celltype", "tiny_cnn", crop_size=32, crop_mode="nucleus")
    assert make_config("celltype", "tiny_cnn", crop_size=32)["crop_mode"] == "image"
    from training.data.singlecell import load_crops

    with pytest.raises(ValueError, match="crop_mode"):
        load_crops([], 32, crop_mode="nucleus")


def test_loader_caches_each_mode_apart(tmp_path):
    from PIL import Image

    from training.data.singlecell import CellRecord, load_crops

    records = []
    for k, um in enumerate((0.25, 0.3, 0.35)):
        path = tmp_path / "cells" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(_cell_image(um)).save(path)
        records.append(CellRecord("pbc", None, "healthy", "lymphocyte", "LYT", path))
    cache = tmp_path / "cache"
    whole, kept = load_crops(records, 48, cache=cache)
    boxed, _ = load_crops(records, 48, cache=cache, crop_mode="cell_box")
    assert len(kept) == 3 and len(list(cache.glob("crops-*.npz"))) == 2
    assert not np.array_equal(whole, boxed)
    again, _ = load_crops(records, 48, cache=cache, crop_mode="cell_box")  # from the cache
    np.testing.assert_array_equal(again, boxed)
    expected = np.stack(
        [single_cell_crop(_cell_image(um), 48, "cell_box") for um in (0.25, 0.3, 0.35)]
    )
    np.testing.assert_array_equal(boxed, expected)
