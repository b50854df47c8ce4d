"""`training.evaluate_roi`: the synthetic bars on a held-out slide, a real-like field on cream
glass, the figure and the report (synthetic data; the real overviews when present)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from marrowscope.paths import shared_data_dir
from marrowscope.slides import open_slide
from tests.slides.test_roi import _cream
from training import evaluate_roi

OVERVIEWS = shared_data_dir() / "deepapl" / "overviews.csv"


def test_synthetic_slide_meets_the_bars(small_slide: Path) -> None:
    row = evaluate_roi.evaluate_synthetic_slide(small_slide)
    assert row["auroc"] >= evaluate_roi.AUROC_BAR
    assert row["monolayer_precision"] >= evaluate_roi.PRECISION_BAR
    assert row["selected"] >= 1 and row["cells_estimated"] > 0


def test_cream_field_is_a_smear_and_is_drawn(small_slide: Path, tmp_path: Path) -> None:
    with open_slide(small_slide) as slide:
        field = _cream(slide.read_region((1024, 512), 0, (1024, 1024)))  # 0.5 um/px
    row, regions, selected = evaluate_roi.evaluate_overview(field, 0.5)
    assert row["smear"] and row["selected"] == len(selected) >= 1
    png = evaluate_roi.draw_regions(field, regions, selected, tmp_path / "fig.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (900, 900)


def test_blank_field_is_refused_with_a_reason() -> None:
    row, _, selected = evaluate_roi.evaluate_overview(np.full((600, 600, 3), 240, np.uint8), 0.5)
    assert not row["smear"] and row["why"] == "no_nucleated_cells" and not selected


@pytest.mark.real_data
@pytest.mark.skipif(not OVERVIEWS.is_file(), reason="real overviews not present")
def test_main_writes_the_report(tmp_path: Path) -> None:
    args = evaluate_roi.get_args_parser().parse_args(
        ["--slides", "0", "--out", str(tmp_path), "--figure", str(tmp_path / "f.png")]
    )
    result = evaluate_roi.main(args)
    real = result["real_eval"]
    assert real["overviews"] == 43 and real["judged_smears"] >= 20
    assert json.loads((tmp_path / "roi.json").read_text())["real_eval"]["overviews"] == 43
    assert "judged smears" in (tmp_path / "roi.md").read_text()
    assert (tmp_path / "f.png").is_file()


def test_bad_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        evaluate_roi.main(
            argparse.Namespace(
                **{
                    **vars(evaluate_roi.get_args_parser().parse_args(["--out", str(tmp_path)])),
                    "overview_um_per_px": 0.0,
                }
            )
        )
