"""Segmentation service as a real process: detection + morphometrics over OIP gRPC."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from marrowscope.imaging import encode_png
from marrowscope.morphometrics import FEATURE_NAMES
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    metric,
    status_of,
)

ALIAS = "test-services-segmentation"
MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def service(serve_registered, tmp_path_factory):
    model_dir = make_tiny_model_dir("segmentation", tmp_path_factory.mktemp("seg") / "m")
    # an untrained detector scores low: threshold 0 so that N > 0 and morphometrics run
    return serve_registered(
        "segmentation",
        model_dir,
        ALIAS,
        score_threshold=0.0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_image_pixels=200_000,
    )


def _image_bytes(data: bytes) -> list:
    return [infer_input("IMAGE", np.array([data], dtype=object), "BYTES")]


def _smear(h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((h, w, 3), 235, np.uint8)
    for _ in range(6):
        y, x = rng.integers(12, h - 12), rng.integers(12, w - 12)
        yy, xx = np.ogrid[:h, :w]
        image[(yy - y) ** 2 + (xx - x) ** 2 < 64] = (110, 60, 150)
    return image


def test_metadata_and_infer_with_scale(client, service):
    check_server_and_metadata(
        client,
        "segmentation",
        service.version,
        {"IMAGE": ("BYTES", [1]), "UM_PER_PX": ("FP32", [1]), "BOXES_IN": ("FP32", [-1, 4])},
    )
    inputs = _image_bytes(encode_png(_smear())) + [
        infer_input("UM_PER_PX", np.array([0.3], np.float32), "FP32")
    ]
    before = metric(
        service.metrics_url, "marrowscope_requests_total", {"model": "segmentation", "status": "ok"}
    )
    r = client.infer("segmentation", inputs)
    assert r.get_response().model_version == service.version
    params = r.get_response().parameters  # no splitter configured: the classical split
    assert params["morphometrics_split"].string_param == "classical"
    assert params["splitter_version"].string_param == ""
    boxes, scores = r.as_numpy("BOXES"), r.as_numpy("SCORES")
    n = len(boxes)
    assert n > 0 and boxes.shape == (n, 4) and boxes.dtype == np.float32
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert scores.shape == (n,) and (np.diff(scores) <= 0).all()
    assert {x.decode() for x in r.as_numpy("LABELS")} <= {"BLA", "LYT", "RBC"}
    assert [x.decode() for x in r.as_numpy("FEATURE_NAMES")] == list(FEATURE_NAMES)
    features = r.as_numpy("FEATURES")
    assert features.shape == (n, len(FEATURE_NAMES)) and np.isfinite(features).all()
    assert (
        metric(
            service.metrics_url,
            "marrowscope_requests_total",
            {"model": "segmentation", "status": "ok"},
        )
        == before + 1
    )


def test_scale_changes_areas_in_um2(client):
    data = encode_png(_smear())
    px = client.infer("segmentation", _image_bytes(data))
    um = client.infer(
        "segmentation",
        _image_bytes(data) + [infer_input("UM_PER_PX", np.array([0.5], np.float32), "FP32")],
    )
    col = list(FEATURE_NAMES).index("cell_area")
    assert [x.decode() for x in px.as_numpy("LENGTH_UNIT")] == ["px"]
    assert [x.decode() for x in um.as_numpy("LENGTH_UNIT")] == ["um"]
    a_px, a_um = px.as_numpy("FEATURES")[:, col], um.as_numpy("FEATURES")[:, col]
    ok = a_px > 0
    assert ok.any()
    np.testing.assert_allclose(a_um[ok], a_px[ok] * 0.25, rtol=1e-4)


def test_blank_image_outputs_agree_on_n(client):
    # an untrained detector at threshold 0 may or may not box a blank slide; every output
    # must agree on N either way (N = 0 included)
    r = client.infer("segmentation", _image_bytes(encode_png(np.full((64, 64, 3), 235, np.uint8))))
    n = len(r.as_numpy("SCORES"))
    assert r.as_numpy("BOXES").shape == (n, 4)
    assert r.as_numpy("FEATURES").shape == (n, len(FEATURE_NAMES))


@pytest.mark.parametrize(
    ("inputs", "code"),
    [
        (lambda: _image_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)), "INVALID_ARGUMENT"),
        (lambda: _image_bytes(encode_png(_smear())[:300]), "INVALID_ARGUMENT"),
        (lambda: _image_bytes(b"GIF89a" + bytes(64)), "INVALID_ARGUMENT"),
        (lambda: _image_bytes(encode_png(np.zeros((600, 600, 3), np.uint8))), "INVALID_ARGUMENT"),
        (
            lambda: [infer_input("IMAGE", np.zeros((1, 8, 8, 3), np.uint8), "UINT8")],
            "INVALID_ARGUMENT",
        ),
        (
            lambda: (
                _image_bytes(encode_png(_smear()))
                + [infer_input("UM_PER_PX", np.array([-1.0], np.float32), "FP32")]
            ),
            "INVALID_ARGUMENT",
        ),
        (lambda: _image_bytes(bytes(2 * MAX_MESSAGE_BYTES)), "RESOURCE_EXHAUSTED"),
    ],
    ids=[
        "corrupt-png",
        "truncated-png",
        "gif",
        "too-many-pixels",
        "wrong-dtype",
        "negative-scale",
        "oversized-message",
    ],
)
def test_bad_inputs_get_status_and_service_stays_healthy(client, service, inputs, code):
    with pytest.raises(InferenceServerException) as info:
        client.infer("segmentation", inputs())
    assert status_of(info.value) == code, info.value.message()
    check_still_healthy(service)
    assert (
        client.infer("segmentation", _image_bytes(encode_png(_smear()))).as_numpy("BOXES")
        is not None
    )


def _boxes_in(boxes) -> list:
    return [infer_input("BOXES_IN", np.asarray(boxes, np.float32).reshape(-1, 4), "FP32")]


def test_boxes_in_measures_exactly_the_given_boxes(client, service):
    from marrowscope.case import SINGLE_CELL_LABEL
    from marrowscope.morphometrics import measure_cells
    from marrowscope.taxonomy import NON_NUCLEATED_DETECTOR_LABELS

    image = _smear(96, 128)
    boxes = np.array([[0, 0, 128, 96], [10.5, 20, 40, 60]], np.float32)
    scale = [infer_input("UM_PER_PX", np.array([0.3], np.float32), "FP32")]
    r = client.infer("segmentation", _image_bytes(encode_png(image)) + scale + _boxes_in(boxes))
    np.testing.assert_array_equal(r.as_numpy("BOXES"), boxes)
    np.testing.assert_array_equal(r.as_numpy("SCORES"), np.ones(2, np.float32))
    labels = [x.decode() for x in r.as_numpy("LABELS")]
    assert (
        labels == [SINGLE_CELL_LABEL] * 2 and SINGLE_CELL_LABEL not in NON_NUCLEATED_DETECTOR_LABELS
    )
    assert [x.decode() for x in r.as_numpy("LENGTH_UNIT")] == ["um"]
    # the same rows as measuring the boxes in process (the classical split, as served)
    want = measure_cells(image, boxes, float(np.float32(0.3)))
    np.testing.assert_allclose(r.as_numpy("FEATURES"), want, rtol=1e-6)
    empty = client.infer(
        "segmentation", _image_bytes(encode_png(image)) + _boxes_in(np.zeros((0, 4)))
    )
    assert empty.as_numpy("BOXES").shape == (0, 4)
    assert empty.as_numpy("FEATURES").shape == (0, len(FEATURE_NAMES))


@pytest.mark.parametrize(
    "boxes",
    [
        [[0, 0, 129, 96]],  # outside the 128x96 image
        [[-1, 0, 20, 20]],
        [[0, 0, 20, 97]],
        [[20, 0, 10, 20]],  # x1 > x2
        [[0, np.nan, 20, 20]],
        [[0, 0, np.inf, 20]],
    ],
    ids=["right", "left", "bottom", "inverted", "nan", "inf"],
)
def test_bad_boxes_in_is_invalid_argument(client, service, boxes):
    with pytest.raises(InferenceServerException) as info:
        client.infer("segmentation", _image_bytes(encode_png(_smear())) + _boxes_in(boxes))
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
    assert "BOXES_IN" in info.value.message()
    check_still_healthy(service)


def test_boxes_in_of_the_wrong_shape_is_invalid_argument(client, service):
    bad = [infer_input("BOXES_IN", np.zeros((2, 3), np.float32), "FP32")]
    with pytest.raises(InferenceServerException) as info:
        client.infer("segmentation", _image_bytes(encode_png(_smear())) + bad)
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
