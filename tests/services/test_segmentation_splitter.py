"""Segmentation service with the learned nucleus/cytoplasm split as a second, separately
versioned model, and its fallback to the classical split (real processes, real MLflow)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from marrowscope.imaging import encode_png
from marrowscope.morphometrics import FEATURE_NAMES
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import check_still_healthy, infer_input, register

ALIAS = "test-services-segmentation-splitter"


@pytest.fixture(scope="module")
def services(mlflow_server, start_service, tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-splitter")
    register(mlflow_server, "segmentation", make_tiny_model_dir("segmentation", root / "d"), ALIAS)
    splitter_version = register(
        mlflow_server, "nucseg", make_tiny_model_dir("nucseg", root / "n"), ALIAS
    )
    common = {"model_uri": f"models:/marrowscope-segmentation@{ALIAS}", "score_threshold": 0.0}
    learned = start_service(
        "segmentation", splitter_uri=f"models:/marrowscope-nucseg@{ALIAS}", **common
    )
    broken = start_service(
        "segmentation", splitter_uri="models:/marrowscope-nucseg@absent", **common
    )
    return learned, broken, splitter_version


def _smear() -> np.ndarray:
    rng = np.random.default_rng(1)
    image = np.full((96, 128, 3), 235, np.uint8)
    yy, xx = np.ogrid[:96, :128]
    for _ in range(6):
        y, x = rng.integers(14, 82), rng.integers(14, 114)
        image[(yy - y) ** 2 + (xx - x) ** 2 < 100] = (200, 170, 210)
        image[(yy - y) ** 2 + (xx - x) ** 2 < 30] = (90, 40, 140)
    return image


def _infer(service):
    client = tc.InferenceServerClient(url=service.address)
    try:
        inputs = [
            infer_input("IMAGE", np.array([encode_png(_smear())], dtype=object), "BYTES"),
            infer_input("UM_PER_PX", np.array([0.3], np.float32), "FP32"),
        ]
        return client.infer("segmentation", inputs)
    finally:
        client.close()


def _split_of(result) -> tuple[str, str]:
    params = result.get_response().parameters
    return params["morphometrics_split"].string_param, params["splitter_version"].string_param


def test_learned_split_is_served_and_named(services):
    learned, broken, splitter_version = services
    r = _infer(learned)
    assert _split_of(r) == ("learned", splitter_version)
    n = len(r.as_numpy("BOXES"))
    features = r.as_numpy("FEATURES")
    assert n > 0 and features.shape == (n, len(FEATURE_NAMES)) and np.isfinite(features).all()
    ok = features[:, list(FEATURE_NAMES).index("segmentation_ok")]
    assert set(np.unique(ok)) <= {0.0, 1.0}
    # same detector, same boxes: the features differ because another split produced them
    fallback = _infer(broken)
    np.testing.assert_array_equal(fallback.as_numpy("BOXES"), r.as_numpy("BOXES"))
    assert not np.array_equal(fallback.as_numpy("FEATURES"), features)


def test_splitter_that_cannot_load_falls_back_to_classical(services):
    _, broken, _ = services
    check_still_healthy(broken)
    assert _split_of(_infer(broken)) == ("classical", "")
    assert "classical nucleus/cytoplasm split" in broken.log_tail(20000)
