"""In-process predictors and analyse_case on tiny untrained models."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope.errors import InvalidInput
from marrowscope.inference import (
    CellTyper,
    Detections,
    Detector,
    EnsemblePredictor,
    Npm1Predictor,
    analyse_case,
    cell_calls,
    load_predictor,
)
from marrowscope.models import load_model
from tests.fixtures_mlflow import make_tiny_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES

    root = tmp_path_factory.mktemp("models")
    seg = make_tiny_model_dir(
        "segmentation",
        root / "seg",
        classes=["cell", "RBC"],
        min_size=96,
        max_size=128,
        hyperparameters={"score_threshold": 0.0, "box_detections_per_img": 20},
    )
    cel = make_tiny_model_dir(
        "celltype", root / "cel", outputs=[*CODES, *ATTRIBUTE_CODES], cell_head="softmax"
    )
    return {
        "seg": seg,
        "cel": cel,
        "ens": make_tiny_model_dir("ensemble", root / "ens"),
        "npm1": make_tiny_model_dir("npm1", root / "npm1", input_size=[48, 64]),
    }


def _image(seed=0, hw=(96, 128)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def test_detector_outputs_documented_shapes(models):
    det = Detector(load_model(models["seg"]))
    out = det.predict(_image(), score_threshold=0.0)
    assert isinstance(out, Detections)
    assert out.boxes.dtype == np.float32 and out.boxes.shape == (len(out), 4)
    assert out.scores.dtype == np.float32 and set(out.labels) <= {"cell", "RBC"}
    assert np.all(np.diff(out.scores) <= 0)
    assert len(det.predict(_image(), score_threshold=1.0)) == 0
    batch = det.predict_batch([_image(1), _image(2, (64, 80))], 0.0)
    assert len(batch) == 2 and np.all(batch[1].boxes[:, 2] <= 80 + 1e-3)
    with pytest.raises(InvalidInput, match="uint8"):
        det.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(InvalidInput, match="score_threshold"):
        det.predict(_image(), 1.5)


def test_celltyper_probabilities_and_size_check(models):
    typer = CellTyper(load_model(models["cel"]))
    crops = typer.crops(_image(), np.array([[10, 10, 40, 50], [60, 20, 90, 60]], np.float32))
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    probs = typer.predict(crops)
    assert probs.shape == (2, len(typer.names)) and probs.dtype == np.float32
    from marrowscope.taxonomy import CODES

    np.testing.assert_allclose(probs[:, : len(CODES)].sum(1), 1.0, rtol=1e-5)  # softmax cell head
    assert typer.predict(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, len(typer.names))
    with pytest.raises(InvalidInput, match="32x32"):
        typer.predict(np.zeros((1, 16, 16, 3), np.uint8))


def test_ensemble_refuses_mismatched_names(models):
    from marrowscope.features import case_feature_names

    ens = EnsemblePredictor(load_model(models["ens"]))
    names = list(case_feature_names())
    p = ens.predict(names, np.zeros(len(names), np.float32))
    assert 0.0 <= p <= 1.0
    with pytest.raises(InvalidInput, match="feature names differ"):
        ens.predict(names[::-1], np.zeros(len(names), np.float32))
    assert ens.predict_batch(names, np.zeros((3, len(names)))).shape == (3,)


def test_npm1_input_size_and_case_mean(models):
    npm = Npm1Predictor(load_model(models["npm1"]))
    assert npm.input_size == (48, 64)
    batch = np.stack([npm.prepare(_image(i)) for i in range(3)])
    p = npm.predict(batch)
    assert p.shape == (3,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    assert npm.predict_case([_image(i) for i in range(3)]) == pytest.approx(
        float(p.mean()), abs=1e-6
    )
    with pytest.raises(InvalidInput, match="48x64"):
        npm.predict(np.zeros((1, 64, 64, 3), np.uint8))


def test_wrong_kind_and_device_are_refused(models):
    with pytest.raises(InvalidInput, match="needs a detector"):
        Detector(load_model(models["cel"]))
    with pytest.raises(InvalidInput, match="autocast"):
        CellTyper(load_model(models["cel"]), autocast="int4")
    assert load_predictor(str(models["npm1"])).version.startswith("local-")


def test_analyse_case_builds_the_case_vector(models):
    from marrowscope.features import case_feature_names
    from marrowscope.morphometrics import FEATURE_NAMES

    det, typer = Detector(load_model(models["seg"])), CellTyper(load_model(models["cel"]))
    images = [_image(3), _image(4)]
    result = analyse_case(images, det, typer, um_per_px=0.27, score_threshold=0.0)
    assert result.feature_names == case_feature_names()
    assert (
        result.features.shape == (len(case_feature_names()),)
        and result.features.dtype == np.float32
    )
    assert result.n_detected == sum(len(d.detections) for d in result.images) > 0
    for im in result.images:
        assert im.morphometrics.shape == (len(im.detections), len(FEATURE_NAMES))
        for label, typed in zip(im.detections.labels, im.cell_types, strict=True):
            assert (typed is None) == (label == "RBC")
    assert len(result.cells) == sum(t is not None for im in result.images for t in im.cell_types)
    empty = analyse_case(images, det, typer, score_threshold=1.0)
    assert empty.n_detected == 0 and not empty.features.any()
    with pytest.raises(InvalidInput, match="at least one image"):
        analyse_case([], det, typer)


def test_cell_calls_need_every_code():
    with pytest.raises(InvalidInput, match="lack"):
        cell_calls(np.zeros((1, 2)), ["BLA", "LYT"], np.zeros((1, 1)), ["cell_area"])


def test_analyse_case_of_single_cell_images_measures_each_image_whole(models):
    from marrowscope.case import SINGLE_CELL_LABEL
    from marrowscope.imaging import resize_for_model
    from marrowscope.morphometrics import measure_cells

    det, typer = Detector(load_model(models["seg"])), CellTyper(load_model(models["cel"]))
    images = [_image(5, (60, 64)), _image(6, (72, 70))]
    result = analyse_case(images, det, typer, um_per_px=0.27, cells=True)
    assert result.n_detected == len(result.cells) == 2  # an untrained typer may say RBC
    for im, pixels in zip(result.images, images, strict=True):
        h, w = pixels.shape[:2]
        assert im.detections.labels == (SINGLE_CELL_LABEL,)
        assert im.detections.boxes.tolist() == [[0.0, 0.0, w, h]]
        want = measure_cells(pixels, im.detections.boxes, float(np.float32(0.27)))
        np.testing.assert_array_equal(im.morphometrics, want)
        crop = resize_for_model(pixels, (typer.crop_size, typer.crop_size))[None]
        (call,) = im.cells
        assert call.probs == pytest.approx(
            dict(zip(typer.names, typer.predict(crop)[0], strict=True))
        )
