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
        "DOMAIN": [-1, 2],
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
    # this version carries no domain reference: no distances, and the response says so
    assert r.as_numpy("DOMAIN") is None
    assert r.get_response().parameters["domain_reference"].string_param == "absent"
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


def _reference_for(model_dir, crops, **over):
    from marrowscope.domain import DomainReference
    from training.domain import fit_reference

    typer = CellTyper(load_model(model_dir))
    _, emb = typer.predict_with_embeddings(crops)
    ref = fit_reference(emb, crops, n_components=4)
    return DomainReference(**{**ref.__dict__, "threshold": 2.0, **over})


def test_domain_distances_with_the_embeddings_match_in_process(tmp_path):
    """In process (the handler the service runs): a version with `domain.json` answers
    each crop's distances with its embeddings, and its threshold as a parameter."""
    from services.celltype.config import CelltypeSettings
    from services.celltype.model import CelltypeHandler

    model_dir = make_tiny_model_dir("celltype", tmp_path / "m", crop_size=CROP)
    crops = np.random.default_rng(3).integers(0, 256, (40, CROP, CROP, 3), dtype=np.uint8)
    reference = _reference_for(model_dir, crops)
    reference.save(model_dir)
    handler = CelltypeHandler(model_dir, CelltypeSettings(model_uri=str(model_dir)))
    handler.load()
    assert handler.response_parameters == {
        "domain_reference": "present",
        "domain_threshold": "2.0",
    }
    out = handler.infer({"CROPS": crops[:5]}, {"embeddings": True})
    np.testing.assert_allclose(out["DOMAIN"], reference.cell_scores(out["EMBEDDINGS"], crops[:5]))
    assert "DOMAIN" not in handler.infer({"CROPS": crops[:5]}, {})  # only with the embeddings


def test_a_broken_or_mismatched_domain_reference_keeps_the_version_from_loading(tmp_path):
    from marrowscope.domain import REFERENCE_FILE
    from marrowscope.errors import ModelNotReady
    from services.celltype.config import CelltypeSettings
    from services.celltype.model import CelltypeHandler

    model_dir = make_tiny_model_dir("celltype", tmp_path / "m", crop_size=CROP)
    settings = CelltypeSettings(model_uri=str(model_dir))
    (model_dir / REFERENCE_FILE).write_text('{"format": 1}')
    with pytest.raises(ModelNotReady, match="domain reference"):
        CelltypeHandler(model_dir, settings)
    crops = np.random.default_rng(4).integers(0, 256, (40, CROP, CROP, 3), dtype=np.uint8)
    good = _reference_for(model_dir, crops)
    d = good.embedding_dim + 1  # a reference made for another typer
    good.__class__(
        **{
            **good.__dict__,
            "pca_mean": np.zeros(d),
            "pca_components": np.zeros((good.pca_components.shape[0], d)),
        }
    ).save(model_dir)
    handler = CelltypeHandler(model_dir, settings)
    with pytest.raises(ModelNotReady, match="reads .*-d embeddings"):
        handler.load()


def test_a_typer_of_another_crop_mode_is_not_served(tmp_path):
    """A `cell_box` typer (marrowscope.case.CROP_MODES) would get single-cell images cut
    whole by the gateway: the version does not load, and says why."""
    from marrowscope.errors import ModelNotReady
    from services.celltype.config import CelltypeSettings
    from services.celltype.model import CelltypeHandler

    model_dir = make_tiny_model_dir(
        "celltype", tmp_path / "m", crop_size=CROP, crop_mode="cell_box"
    )
    with pytest.raises(ModelNotReady, match="'cell_box' crops"):
        CelltypeHandler(model_dir, CelltypeSettings(model_uri=str(model_dir)))
    image_mode = make_tiny_model_dir("celltype", tmp_path / "i", crop_size=CROP)
    CelltypeHandler(image_mode, CelltypeSettings(model_uri=str(image_mode)))  # loads
