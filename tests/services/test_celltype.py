"""Celltype service as a real process: crop size from the loaded model, probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from marrowscope.inference import CellTyper
from marrowscope.models import load_model
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    status_of,
)

ALIAS = "test-services-celltype"
CROP = 24  # not the tiny default, so the metadata must come from the loaded model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("celltype", tmp_path_factory.mktemp("ct") / "m", crop_size=CROP)


@pytest.fixture(scope="module")
def service(serve_registered, model_dir):
    return serve_registered("celltype", model_dir, ALIAS)


def test_metadata_has_the_models_crop_size_and_infer_matches_in_process(client, service, model_dir):
    check_server_and_metadata(
        client, "celltype", service.version, {"CROPS": ("UINT8", [-1, CROP, CROP, 3])}
    )
    md = client.get_model_metadata("celltype")
    typer = CellTyper(load_model(model_dir))
    k = len(typer.names)
    d = typer.embedding_dim
    assert {t.name: list(t.shape) for t in md.outputs} == {
        "PROBS": [-1, k],
        "NAMES": [k],
        "EMBEDDINGS": [-1, d],
    }
    crops = np.random.default_rng(1).integers(0, 256, (3, CROP, CROP, 3), dtype=np.uint8)
    r = client.infer("celltype", [infer_input("CROPS", crops, "UINT8")])
    assert r.get_response().model_version == service.version
    assert [x.decode() for x in r.as_numpy("NAMES")] == list(typer.names)
    probs = r.as_numpy("PROBS")
    assert probs.shape == (3, k) and ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs, typer.predict(crops), atol=1e-5)
    # embeddings only when asked for: a plain request gets none
    assert r.as_numpy("EMBEDDINGS") is None


def test_embeddings_when_asked_match_in_process(client, model_dir):
    typer = CellTyper(load_model(model_dir))
    crops = np.random.default_rng(2).integers(0, 256, (4, CROP, CROP, 3), dtype=np.uint8)
    r = client.infer(
        "celltype", [infer_input("CROPS", crops, "UINT8")], parameters={"embeddings": True}
    )
    probs, embeds = typer.predict_with_embeddings(crops)
    got = r.as_numpy("EMBEDDINGS")
    assert got.shape == (4, typer.embedding_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, embeds, atol=1e-5)
    # the same forward pass: the probabilities are the plain request's
    np.testing.assert_allclose(r.as_numpy("PROBS"), probs, atol=1e-5)
    np.testing.assert_allclose(probs, typer.predict(crops), atol=1e-6)
    assert np.abs(got).sum() > 0
    with pytest.raises(InferenceServerException) as err:
        client.infer(
            "celltype", [infer_input("CROPS", crops, "UINT8")], parameters={"embeddings": "yes"}
        )
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "must be a bool" in str(err.value)


def test_zero_crops(client):
    r = client.infer(
        "celltype", [infer_input("CROPS", np.zeros((0, CROP, CROP, 3), np.uint8), "UINT8")]
    )
    assert r.as_numpy("PROBS").shape[0] == 0


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda c: c.infer(
                "celltype",
                [infer_input("CROPS", np.zeros((1, CROP + 1, CROP + 1, 3), np.uint8), "UINT8")],
            ),
            "INVALID_ARGUMENT",
        ),
        (
            lambda c: c.infer(
                "celltype", [infer_input("CROPS", np.zeros((1, CROP, CROP, 3), np.float32), "FP32")]
            ),
            "INVALID_ARGUMENT",
        ),
        (
            lambda c: c.infer(
                "celltype",
                [infer_input("CROPS", np.zeros((1, CROP, CROP, 3), np.uint8), "UINT8")],
                model_version="999",
            ),
            "NOT_FOUND",
        ),
        (
            lambda c: c.infer(
                "nosuchmodel",
                [infer_input("CROPS", np.zeros((1, CROP, CROP, 3), np.uint8), "UINT8")],
            ),
            "NOT_FOUND",
        ),
    ],
    ids=["wrong-crop-size", "wrong-dtype", "unknown-version", "unknown-model"],
)
def test_bad_requests_get_status_and_service_stays_healthy(client, service, call, code):
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert status_of(info.value) == code, info.value.message()
    check_still_healthy(service)
