"""ROI selection measured against the synthetic slide's zone ground truth (synthetic data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from marrowscope.roi import (
    STOP_EXHAUSTED,
    STOP_TARGET,
    RoiConfig,
    score_image,
    score_slide,
    select_regions,
)
from marrowscope.slides import SlideError, open_slide
from training.data.synth_slide import ZONE, load_truth


@pytest.fixture(scope="module")
def scored(small_slide: Path):
    spec, zmap, counts = load_truth(small_slide)
    cfg = RoiConfig(region_um=spec.block * spec.mpp)
    with open_slide(small_slide) as slide:
        return score_slide(slide, cfg), zmap, counts, cfg


def test_scores_separate_monolayer(scored) -> None:
    regions, zmap, _, _ = scored
    y = [zmap[r.row, r.col] == ZONE["monolayer"] for r in regions]
    assert roc_auc_score(y, [r.score for r in regions]) >= 0.95


def test_selection_lies_in_monolayer_and_stops_for_a_reason(scored) -> None:
    regions, zmap, counts, cfg = scored
    sel = select_regions(regions, cfg)
    inside = np.mean([zmap[r.row, r.col] == ZONE["monolayer"] for r in sel.regions])
    assert inside >= 0.95
    assert sel.stop_reason in (STOP_TARGET, STOP_EXHAUSTED)
    true_cells = sum(counts[r.row, r.col] for r in sel.regions)
    assert abs(sel.cells - true_cells) <= 0.2 * true_cells
    small = select_regions(regions, RoiConfig(region_um=cfg.region_um, cell_target=30))
    assert small.stop_reason == STOP_TARGET and small.cells >= 30
    assert len(small.regions) < len(sel.regions)


def test_empty_glass_is_not_a_smear() -> None:
    glass = np.full((512, 512, 3), 236, np.uint8)
    with pytest.raises(SlideError) as exc:
        select_regions(score_image(glass, um_per_px=2.0))
    assert exc.value.code == "not_a_smear"
