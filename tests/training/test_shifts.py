"""The generalisation suite's shifts: deterministic, shape-keeping, and each moves the
pixels the way its name says (a wrong sign or a no-op shift would fail here)."""

from __future__ import annotations

import numpy as np
import pytest

from training.shifts import SHIFT_NAMES, apply_shift, get_shift


def _cell() -> np.ndarray:
    """A pale background with a dark purple disc in the middle (a stained nucleus)."""
    image = np.full((64, 60, 3), (225, 215, 220), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :60]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 <= 12**2
    image[disc] = (90, 40, 130)
    image[::7, ::5] = (200, 190, 205)  # some texture so blur has something to remove
    return image


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_every_shift_keeps_shape_and_is_deterministic(name: str) -> None:
    image = _cell()
    out = apply_shift(image, name)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, apply_shift(image, name))
    if name != "none":
        assert not np.array_equal(out, image), f"{name} changed nothing"
    assert np.array_equal(image, _cell()), "the input was modified in place"


def test_background_shift_moves_the_background_not_the_nucleus() -> None:
    image = _cell()
    out = apply_shift(image, "bg_warm").astype(int) - image.astype(int)
    assert out[2, 2, 0] >= 8 and out[2, 2, 2] <= -8
    assert abs(out[32, 30, 0]) <= 5


def test_stain_shift_moves_the_nucleus_not_the_background() -> None:
    image = _cell()
    out = apply_shift(image, "stain_blue").astype(int) - image.astype(int)
    assert out[32, 30, 2] >= 8 and out[32, 30, 0] <= -8
    assert abs(out[2, 2, 2]) <= 3


def test_scale_shifts_change_the_cell_size() -> None:
    image = _cell()

    def dark_area(x: np.ndarray) -> int:
        return int((x.mean(axis=2) < 120).sum())

    base = dark_area(image)
    assert dark_area(apply_shift(image, "scale_up")) > base * 1.2
    assert dark_area(apply_shift(image, "scale_down")) < base * 0.8


def test_optical_shifts_remove_texture() -> None:
    image = _cell()
    for name in ("blur", "defocus"):
        out = apply_shift(image, name)
        assert out[:16].astype(float).std() < image[:16].astype(float).std()


def test_unknown_shift_and_bad_input_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="unknown shift 'tilt'"):
        get_shift("tilt")
    with pytest.raises(ValueError, match="uint8"):
        apply_shift(np.zeros((8, 8), dtype=np.uint8), "blur")
