"""Slide bombs are refused from the file's structure (`marrowscope.slidecheck`), and region
scoring of any file that passes is bounded in regions and time and stops when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from marrowscope.roi import RoiConfig, grid_sample, score_slide
from marrowscope.slidecheck import ScanChecks, open_scan
from marrowscope.slides import SlideError
from tests.slides.bombs import write_bomb

OFF = ScanChecks(min_bytes_per_pixel=0.0, max_shared_tiles=1.0)


@pytest.mark.parametrize(
    ("side", "overview", "code"),
    [
        (20_000, True, "compression_implausible"),  # 0.0005 byte/px
        (20_000, False, "no_overview"),  # one level of 400 Mpx: nothing small enough to check
        (4_096, True, "tiles_shared"),  # 0.012 byte/px passes; 256 tiles, one stored
    ],
)
def test_slide_bombs_are_refused_with_the_reason(
    tmp_path: Path, side: int, overview: bool, code: str
) -> None:
    bomb = write_bomb(tmp_path / "bomb.tiff", side, overview=overview)
    assert bomb.stat().st_size < 600_000
    with pytest.raises(SlideError) as exc:
        open_scan(bomb)
    assert exc.value.code == code, exc.value


def test_a_real_slide_passes_every_check(small_slide: Path) -> None:
    with open_scan(small_slide) as slide:
        assert slide.info.dimensions == (3072, 2048)


def test_grid_sample_spreads_its_budget_over_the_grid() -> None:
    assert grid_sample(2, 3, 10) == [(r, c) for r in range(2) for c in range(3)]
    for rows, cols in ((100, 100), (30, 300), (1, 5000)):
        cells = grid_sample(rows, cols, 400)
        assert 300 <= len(set(cells)) == len(cells) <= 400
        picked_rows, picked_cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
        # spread over the whole grid, not a stripe or a corner
        assert picked_rows[0] < max(1, rows / 10) and picked_rows[-1] >= rows * 0.9 - 1
        assert picked_cols[0] < cols / 10 and picked_cols[-1] >= cols * 0.9


def test_scoring_is_bounded_reports_its_total_first_and_stops_when_asked(
    tmp_path: Path,
) -> None:
    bomb = write_bomb(tmp_path / "bomb.tiff", 20_000)  # 39 x 39 regions of 256 um
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))

    with open_scan(bomb, OFF) as slide:
        regions = score_slide(slide, RoiConfig(max_scored_regions=12), progress=progress)
        assert len(regions) == 12 and calls[0] == (0, 12) and calls[-1] == (12, 12)

        def stop(done: int, total: int) -> None:
            if done == 3:
                raise KeyboardInterrupt  # any exception stops the scoring at once

        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            score_slide(
                slide, RoiConfig(), progress=lambda d, t: (calls.append((d, t)), stop(d, t))
            )
        assert calls[0] == (0, 39 * 39) and len(calls) == 4

        with pytest.raises(SlideError) as exc:
            score_slide(slide, RoiConfig(max_scoring_s=1e-9))
        assert exc.value.code == "scoring_timeout"
