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


def _cream(rgb: np.ndarray) -> np.ndarray:
    """The same field on the cream glass of a real May-Grunwald-Giemsa smear (per-channel
    gain: grey synthetic glass 236/234/238 -> about 253/228/201)."""
    gain = np.array([253 / 236, 228 / 234, 201 / 238])
    return np.clip(np.round(rgb * gain), 0, 255).astype(np.uint8)


def test_cream_glass_scores_like_grey_glass(small_slide: Path) -> None:
    """The defect found on the 43 real overviews: absolute saturation and OD constants read
    tinted glass as cells, so every real field was `not_a_smear`. Scores are now computed
    against the slide's own glass colour and red-cell hue."""
    spec, zmap, _ = load_truth(small_slide)
    with open_slide(small_slide) as slide:
        field = slide.read_region((0, 0), 1, (768, 512))  # 2 um/px, the scoring scale
    cfg = RoiConfig(region_um=spec.block * spec.mpp)
    grey = score_image(field, um_per_px=2.0, config=cfg)
    cream = score_image(_cream(field), um_per_px=2.0, config=cfg)
    y = [zmap[r.row, r.col] == ZONE["monolayer"] for r in cream]
    assert roc_auc_score(y, [r.score for r in cream]) >= 0.95
    assert np.allclose([r.score for r in cream], [r.score for r in grey], atol=0.1)
    assert [r.features.nuclei for r in cream] == pytest.approx(
        [r.features.nuclei for r in grey], abs=2
    )


def test_score_image_resamples_to_the_scoring_scale(small_slide: Path) -> None:
    spec, _, _ = load_truth(small_slide)
    with open_slide(small_slide) as slide:
        fine = slide.read_region((0, 0), 1, (768, 512))
    cfg = RoiConfig(region_um=spec.block * spec.mpp)
    from PIL import Image

    twice = np.asarray(Image.fromarray(fine).resize((1536, 1024), Image.Resampling.BILINEAR))
    a, b = (
        score_image(fine, um_per_px=2.0, config=cfg),
        score_image(twice, um_per_px=1.0, config=cfg),
    )
    assert [(r.row, r.col) for r in a] == [(r.row, r.col) for r in b]
    assert b[1].x == 2 * a[1].x and b[1].size == 2 * a[1].size  # pixels of the given image
    assert np.corrcoef([r.score for r in a], [r.score for r in b])[0, 1] > 0.95
