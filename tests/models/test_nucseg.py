"""The learned nucleus/cytoplasm split: model and splitter contract, morphometrics from its
masks, save/load, and the classical split kept as the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marrowscope.errors import InvalidInput
from marrowscope.models import ModelConfigError, build_model, load_model, make_config, save_model
from marrowscope.models.nucseg import NUCSEG_CLASSES, LearnedSplitter, crops_to_batch
from marrowscope.morphometrics import FEATURE_NAMES, measure_cell, measure_cells
from tests.fixtures_mlflow import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("nucseg", tmp_path_factory.mktemp("nucseg") / "m")


@pytest.fixture(scope="module")
def splitter(model_dir):
    return LearnedSplitter.from_dir(model_dir, version="7")


def _cell_image(h: int = 80, w: int = 96) -> np.ndarray:
    """A pale field with one violet cell (radius 20) holding a dark nucleus (radius 10)."""
    image = np.full((h, w, 3), 235, np.uint8)
    yy, xx = np.ogrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    image[r2 < 400] = (200, 170, 210)
    image[r2 < 100] = (90, 40, 140)
    return image


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_logits_shape_and_dtype(size):
    config = make_config("nucseg", "unet", input_size=[32, 32], base_channels=4, depth=2)
    x = torch.rand(2, 3, *size)
    with torch.inference_mode():
        y = build_model(config).eval()(x)
    assert y.shape == (2, len(NUCSEG_CLASSES), *size) and y.dtype == torch.float32


def test_split_contract(splitter):
    rng = np.random.default_rng(0)
    crops = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(9, 9), (50, 70), (120, 120)]
    ]
    masks = splitter.split(crops, [None, (25.0, 35.0), None])
    assert len(masks) == len(crops)
    for crop, (cell, nucleus) in zip(crops, masks, strict=True):
        assert cell.shape == nucleus.shape == crop.shape[:2]
        assert cell.dtype == nucleus.dtype == np.bool_
        assert not (nucleus & ~cell).any(), "nucleus must lie inside the cell"
    probs = splitter.probabilities(crops[1:2])[0]
    assert probs.shape == (3, 50, 70)
    assert torch.allclose(probs.sum(0), torch.ones(50, 70), atol=1e-4)
    assert float(probs.min()) >= 0.0
    assert splitter.split([]) == []


def test_split_refuses_bad_crops(splitter):
    with pytest.raises(InvalidInput, match="crop 0"):
        splitter.split([np.zeros((10, 10), np.uint8)])
    with pytest.raises(InvalidInput, match="crop 0"):
        splitter.split([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(InvalidInput, match="centres"):
        splitter.split([np.zeros((10, 10, 3), np.uint8)], [None, None])


def test_crops_to_batch_range():
    crops = [np.full((5, 7, 3), 255, np.uint8), np.zeros((40, 30, 3), np.uint8)]
    x = crops_to_batch(crops, (16, 16))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones_like(x[0])) and float(x[1].abs().max()) == 0.0
    assert crops_to_batch([], (16, 16)).shape == (0, 3, 16, 16)


def test_save_load_round_trip_gives_identical_masks(tmp_path, splitter):
    crop = _cell_image()
    config = dict(splitter.config)
    save_model(splitter.module, config, tmp_path / "copy")
    again = LearnedSplitter.from_dir(tmp_path / "copy")
    p1, p2 = splitter.probabilities([crop])[0], again.probabilities([crop])[0]
    assert torch.equal(p1, p2)
    assert again.version.startswith("local-")
    assert load_model(tmp_path / "copy").config["kind"] == "nucseg"


def test_wrong_kind_and_bad_configs_are_refused(tmp_path):
    npm1 = make_tiny_model_dir("npm1", tmp_path / "npm1")
    with pytest.raises(InvalidInput, match="nucseg"):
        LearnedSplitter.from_dir(npm1)
    with pytest.raises(ModelConfigError, match="nucleus_source"):
        make_config("nucseg", "unet", nucleus_source="magic")
    with pytest.raises(ModelConfigError, match="2\\*\\*depth"):
        make_config("nucseg", "unet", input_size=[8, 8], depth=4)


class DiskSplitter:
    """A splitter with known masks: a disk of radius 12 (cell) and 6 (nucleus) at the centre."""

    name, version = "learned", "test"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def split(self, crops, centres=None):
        self.calls.append(len(crops))
        out = []
        for crop, centre in zip(crops, centres, strict=True):
            h, w = crop.shape[:2]
            cy, cx = centre if centre is not None else ((h - 1) / 2, (w - 1) / 2)
            yy, xx = np.ogrid[:h, :w]
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            out.append((r2 <= 144, r2 <= 36))
        return out


def test_measure_cells_takes_features_from_the_splitter_masks_in_one_call():
    image = np.full((120, 160, 3), 235, np.uint8)
    boxes = np.array([[20, 20, 60, 60], [90, 40, 130, 80], [0, 0, 1, 1]], np.float32)
    splitter = DiskSplitter()
    feats = measure_cells(image, boxes, um_per_px=0.5, splitter=splitter)
    assert splitter.calls == [2], "every crop of an image goes to the splitter in one call"
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    disk12, disk6 = 441, 113  # pixel counts of radius-12 / radius-6 digital disks
    np.testing.assert_allclose(feats[:2, col["cell_area"]], disk12 * 0.25)
    np.testing.assert_allclose(feats[:2, col["nucleus_area"]], disk6 * 0.25)
    np.testing.assert_allclose(feats[:2, col["nc_ratio"]], disk6 / (disk12 - disk6), rtol=1e-5)
    assert feats[2, col["segmentation_ok"]] == 0.0  # degenerate box: default row
    # the classical split finds nothing on a blank field, the splitter's masks are used as is
    classical = measure_cells(image, boxes[:2])
    assert (classical[:, col["segmentation_ok"]] == 0).all()


def test_measure_cell_with_splitter_and_errors():
    crop = _cell_image()
    m = measure_cell(crop, splitter=DiskSplitter())
    ((cell, nucleus),) = DiskSplitter().split([crop], [None])
    assert m.features["segmentation_ok"] == 1.0
    assert np.array_equal(m.cell_mask, cell) and np.array_equal(m.nucleus_mask, nucleus)
    assert m.features["cell_area"] == cell.sum()
    with pytest.raises(InvalidInput, match="either"):
        measure_cell(crop, cell_mask=np.ones(crop.shape[:2], bool), splitter=DiskSplitter())


def test_classical_nucleus_source_uses_the_classical_nucleus(model_dir):
    """With nucleus_source classical the net's cell is kept and the nucleus comes from the
    purple-index Otsu inside it (here the cell is forced to the whole crop)."""
    loaded = load_model(model_dir)
    config = {**loaded.config, "nucleus_source": "classical"}
    with torch.no_grad():  # background logit very low: every pixel is cell
        loaded.module.head.bias.copy_(torch.tensor([-50.0, 50.0, 0.0]))
    split = LearnedSplitter(loaded.module, config)
    crop = _cell_image()
    cell, nucleus = split.split([crop])[0]
    assert cell.all()
    yy, xx = np.ogrid[:80, :96]
    truth = (yy - 40) ** 2 + (xx - 48) ** 2 < 100
    assert 2 * (nucleus & truth).sum() / (nucleus.sum() + truth.sum()) > 0.8


def test_combined_source_falls_back_to_the_classical_nucleus_when_the_net_is_unsure(model_dir):
    """nucleus_source combined: the net's nucleus when its nucleus-vs-cytoplasm confidence
    inside the cell reaches nucleus_confidence_min, else the classical one in the net's cell.
    Here the net calls every pixel cytoplasm with certainty 1: its nucleus is empty."""
    loaded = load_model(model_dir)
    with torch.no_grad():
        loaded.module.head.bias.copy_(torch.tensor([-50.0, 50.0, 0.0]))
    crop = _cell_image()

    def split(threshold: float) -> tuple[np.ndarray, np.ndarray]:
        config = {**loaded.config, "nucleus_source": "combined"}
        config["nucleus_confidence_min"] = threshold
        return LearnedSplitter(loaded.module, config).split([crop])[0]

    cell, nucleus = split(0.99)  # confidence 1.0 >= 0.99: the net's (empty) nucleus
    assert cell.all() and not nucleus.any()
    cell, nucleus = split(1.01)  # never sure enough: the classical nucleus
    yy, xx = np.ogrid[:80, :96]
    truth = (yy - 40) ** 2 + (xx - 48) ** 2 < 100
    assert 2 * (nucleus & truth).sum() / (nucleus.sum() + truth.sum()) > 0.8


def test_combined_source_config_is_validated():
    config = make_config("nucseg", "unet", nucleus_source="combined", nucleus_confidence_min=0.9)
    assert config["nucleus_source"] == "combined"
    with pytest.raises(ModelConfigError, match="nucleus_confidence_min"):
        make_config("nucseg", "unet", nucleus_confidence_min=1.5)
