import numpy as np
import pytest
import torch

from marrowscope.errors import InvalidInput
from marrowscope.explain import occlusion_cells, occlusion_grid, pointing_game_ratio


def _scene():
    """A light 64x96 'slide' with one dark 'cell' at rows 10-26, cols 60-80."""
    x = torch.full((1, 3, 64, 96), 0.9)
    x[:, :, 10:26, 60:80] = 0.2
    x[:, :, 40:50, 10:20] = 0.3  # a second cell the model ignores
    mask = np.zeros((64, 96), bool)
    mask[10:26, 60:80] = True
    return x, mask


def _dark_right_half(batch: torch.Tensor) -> torch.Tensor:
    """Score = darkness of the right half: only the first cell matters."""
    return 1.0 - batch[:, :, :, 48:].mean(dim=(1, 2, 3))


def test_grid_points_at_the_cell_that_drives_the_score():
    x, mask = _scene()
    heat = occlusion_grid(_dark_right_half, x, window=8, stride=4)
    assert heat.shape == (64, 96)
    assert heat[mask].mean() > 10 * abs(heat[40:50, 10:20]).mean()
    assert pointing_game_ratio(heat, mask, top_fraction=0.05) > 5.0


def test_cells_importance_ranks_the_relevant_cell_first():
    x, mask = _scene()
    boxes = np.array([[60, 10, 80, 26], [10, 40, 20, 50]], np.float32)
    imp, heat = occlusion_cells(_dark_right_half, x, boxes, batch_size=1)
    assert imp[0] > 0 and abs(imp[1]) < 1e-6
    assert heat[15, 70] == pytest.approx(imp[0])
    assert pointing_game_ratio(heat, mask) > 5.0


def test_boxes_outside_the_image_are_clipped_and_bad_input_is_refused():
    x, _ = _scene()
    imp, _ = occlusion_cells(_dark_right_half, x, np.array([[-10, -10, 200, 200]], np.float32))
    assert imp[0] > 0
    with pytest.raises(InvalidInput):
        occlusion_cells(_dark_right_half, x, np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidInput):
        occlusion_grid(_dark_right_half, x, window=4, stride=8)
    with pytest.raises(InvalidInput):
        occlusion_grid(_dark_right_half, x[0], window=4, stride=2)
    assert np.isnan(pointing_game_ratio(np.zeros((4, 4)), np.zeros((4, 4), bool)))
