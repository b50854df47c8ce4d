"""Reading whole slides through OpenSlide: levels, exact pixels, bounded reads, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from marrowscope.slides import SlideError, open_slide
from tests.slides.conftest import SMALL
from training.data.synth_slide import load_truth, render_region


def test_levels_and_pixel_size(small_slide: Path) -> None:
    with open_slide(small_slide) as slide:
        assert slide.info.level_dimensions == ((3072, 2048), (768, 512), (192, 128))
        assert slide.info.level_downsamples == (1.0, 4.0, 16.0)
        assert slide.info.mpp == pytest.approx(0.5)
        assert slide.level_for_downsample(5.0) == 1


@pytest.mark.parametrize(("level", "ds"), [(0, 1), (1, 4)])
def test_pixels_are_what_the_generator_rendered(small_slide: Path, level: int, ds: int) -> None:
    """Lossless tiles: a tile read back equals the generator's rendering of it."""
    spec, zmap, _ = load_truth(small_slide)
    with open_slide(small_slide) as slide:
        got = slide.read_region((1024, 1024), level, (256, 256))
    want = render_region(spec, zmap, 1024, 1024, 256, 256, ds)
    assert got.shape == (256, 256, 3) and got.dtype == np.uint8
    assert np.array_equal(got, want)


def test_read_outside_the_slide_is_white_glass(small_slide: Path) -> None:
    with open_slide(small_slide) as slide:
        img = slide.read_region((SMALL.width - 8, 0), 0, (32, 8))
    assert (img[:, 16:] == 255).all()


def test_bounded_reads(small_slide: Path) -> None:
    with open_slide(small_slide, max_region_pixels=512 * 512) as slide:
        with pytest.raises(SlideError) as exc:
            slide.read_region((0, 0), 0, (1024, 1024))
        assert exc.value.code == "region_too_large"
        with pytest.raises(SlideError) as exc:
            slide.read_region((0, 0), 3, (16, 16))
        assert exc.value.code == "level_missing"
        with pytest.raises(SlideError) as exc:
            slide.read_region((0, 0), 0, (0, 16))
        assert exc.value.code == "invalid_region"
        with pytest.raises(SlideError) as exc:
            slide.read_level(0)  # a whole level-0 is never decoded
        assert exc.value.code == "region_too_large"


def test_truncated_slide_is_refused_and_kept(small_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.tiff"
    data = small_slide.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError) as exc:
        open_slide(bad)
    assert exc.value.code == "corrupt"
    assert bad.stat().st_size == len(data) * 2 // 3  # the file is left for inspection


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideError) as exc:
        open_slide(text)
    assert exc.value.code == "unknown_format"
    with pytest.raises(SlideError) as exc:
        open_slide(tmp_path / "absent.svs")
    assert exc.value.code == "not_found"


def test_plain_png_is_not_a_slide(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "field.png"
    Image.new("RGB", (64, 64), "white").save(png)
    with pytest.raises(SlideError) as exc:
        open_slide(png)
    assert exc.value.code == "unknown_format"


def test_copy_opens_like_the_original(small_slide: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.tif"
    shutil.copy(small_slide, copy)
    with open_slide(copy) as slide:
        assert slide.info.dimensions == (3072, 2048)


def test_field_cells_draw_the_monolayer_like_a_field_and_only_at_fine_scales() -> None:
    """`cells="fields"` (the demo's slide): the monolayer drawn with the field generator's
    sprites, red cells thinned to a field's density, deterministic and seamless per tile."""
    from training.data.synth_slide import ZONE, SlideSpec, zone_map

    discs = SlideSpec(width=4096, height=3072, block=512, levels=(1, 4), mpp=0.27, seed=7)
    fields = SlideSpec(**{**discs.__dict__, "cells": "fields"})
    zmap = zone_map(discs)
    r, c = np.argwhere(zmap == ZONE["monolayer"])[0]
    x0, y0 = int(c) * 512, int(r) * 512
    a = render_region(fields, zmap, x0, y0, 512, 512, 1)
    assert np.array_equal(a, render_region(fields, zmap, x0, y0, 512, 512, 1))  # deterministic
    b = render_region(discs, zmap, x0, y0, 512, 512, 1)
    changed = np.abs(a.astype(int) - b.astype(int)).sum(-1) > 30
    assert changed.mean() > 0.01  # the cells are drawn anew
    # red cells as sparse as in a field: far more bare glass than the packed monolayer
    glass = lambda im: (im.astype(int).sum(-1) > 3 * 225).mean()  # noqa: E731
    assert glass(a) > glass(b) + 0.2
    # a tile drawn on its own agrees with the same pixels of a larger region (apart from the
    # per-tile sensor noise, sd 1.5): a cell straddling two tiles is drawn the same in both
    part = render_region(fields, zmap, x0 + 256, y0 + 128, 256, 256, 1)
    assert np.abs(part.astype(int) - a[128:384, 256:512].astype(int)).mean() < 2.5
    # coarse pyramid levels keep the discs (no detector reads them)
    coarse = render_region(fields, zmap, 0, 0, 256, 192, 8)
    assert np.array_equal(coarse, render_region(discs, zmap, 0, 0, 256, 192, 8))
    with pytest.raises(ValueError, match="cells"):
        SlideSpec(cells="sprites")
