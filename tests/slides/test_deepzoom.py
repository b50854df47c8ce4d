"""Deep Zoom tiles read from a real slide file (OpenSlide): the pyramid's arithmetic, tiles
that equal the slide's own pixels where a Deep Zoom level is a slide level, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope.deepzoom import DeepZoomLayout, read_tile
from marrowscope.slides import SlideError, open_slide
from tests.slides.conftest import SMALL
from training.data.synth_slide import SlideSpec, write_slide


def test_layout_halves_down_to_one_pixel() -> None:
    layout = DeepZoomLayout(3072, 2048, tile_size=254, overlap=1)
    assert layout.max_level == 12
    assert layout.level_size(12) == (3072, 2048)
    assert layout.level_size(11) == (1536, 1024)
    assert layout.level_size(0) == (1, 1)
    assert layout.tile_count(12) == (13, 9)
    # first tile: no overlap on the left/top; an inner tile: overlap on every side
    assert layout.tile_box(12, 0, 0) == (0, 0, 255, 255)
    assert layout.tile_box(12, 1, 1) == (253, 253, 509, 509)
    # the last column ends at the image's edge
    assert layout.tile_box(12, 12, 8) == (3047, 2031, 3072, 2048)
    assert 'TileSize="254"' in layout.dzi("jpeg") and 'Width="3072"' in layout.dzi("jpeg")


@pytest.mark.parametrize("box", [(13, 0, 0), (12, 13, 0), (12, 0, 9), (13, 0, 0), (-1, 0, 0)])
def test_tiles_outside_the_pyramid_are_refused(box: tuple[int, int, int]) -> None:
    with pytest.raises(SlideError) as err:
        DeepZoomLayout(3072, 2048).tile_box(*box)
    assert err.value.code == "tile_missing"


def test_bad_tile_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="tile_size"):
        DeepZoomLayout(100, 100, tile_size=10)
    with pytest.raises(ValueError, match="overlap"):
        DeepZoomLayout(100, 100, overlap=50)


@pytest.mark.parametrize(("dz_level", "slide_level"), [(12, 0), (10, 1), (8, 2)])
def test_a_tile_is_the_slide_level_s_own_pixels(small_slide, dz_level, slide_level) -> None:
    layout = DeepZoomLayout(SMALL.width, SMALL.height, tile_size=254, overlap=1)
    d = layout.downsample(dz_level)
    with open_slide(small_slide) as slide:
        assert slide.info.level_downsamples[slide_level] == d
        for col, row in ((0, 0), (1, 1)):
            if (col, row) >= layout.tile_count(dz_level):
                continue
            x1, y1, x2, y2 = layout.tile_box(dz_level, col, row)
            tile = read_tile(slide, layout, dz_level, col, row)
            want = slide.read_region((x1 * d, y1 * d), slide_level, (x2 - x1, y2 - y1))
            assert tile.shape == (y2 - y1, x2 - x1, 3)
            np.testing.assert_array_equal(tile, want)


def test_between_slide_levels_a_tile_is_the_finer_level_resized(small_slide) -> None:
    layout = DeepZoomLayout(SMALL.width, SMALL.height, tile_size=254, overlap=0)
    with open_slide(small_slide) as slide:
        tile = read_tile(slide, layout, 11, 1, 1)  # downsample 2: read at level 0, halved
        fine = slide.read_region((508, 508), 0, (508, 508)).astype(np.float32)
    halved = fine.reshape(254, 2, 254, 2, 3).mean(axis=(1, 3))
    assert tile.shape == (254, 254, 3)
    assert np.abs(tile.astype(np.float32) - halved).mean() < 4.0


def test_without_a_pyramid_small_levels_are_refused_not_decoded_whole(tmp_path) -> None:
    flat = tmp_path / "flat.tiff"
    write_slide(flat, SlideSpec(width=2048, height=2048, block=256, tile=256, levels=(1,)))
    layout = DeepZoomLayout(2048, 2048)
    with open_slide(flat) as slide:
        assert read_tile(slide, layout, 10, 0, 0).shape == (255, 255, 3)
        with pytest.raises(SlideError) as err:
            read_tile(slide, layout, 0, 0, 0)  # 1x1 px from 2048x2048 at level 0
    assert err.value.code == "region_too_large"
