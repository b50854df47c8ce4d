"""The MIL model (P(APL | AML) and per-cell attention from cell embeddings) served as its own
OIP model `mil` by the ensemble service process (`MS_ENSEMBLE_MIL_MODEL_URI`), beside the
ensemble, as a real process on loopback ports."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from marrowscope.features import case_feature_names
from marrowscope.inference import MilPredictor
from marrowscope.models import load_model
from marrowscope.models.mil import MilFoldEnsemble
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    register,
    status_of,
)

D = 16
CELLTYPE = {"name": "marrowscope-celltype", "version": "3"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mil")
    return {
        "ensemble": make_tiny_model_dir("ensemble", root / "ens"),
        # what training.apl saves: an inner-fold ensemble with its temperature and bias
        "mil": make_tiny_model_dir(
            "mil",
            root / "mil",
            embedding_dim=D,
            celltype=CELLTYPE,
            members=3,
            calibration={"temperature": 1.7, "bias": -0.3},
        ),
    }


@pytest.fixture(scope="module")
def service(mlflow_server, start_service, dirs):
    ens = register(mlflow_server, "ensemble", dirs["ensemble"], "test-mil-ens")
    mil = register(mlflow_server, "mil", dirs["mil"], "test-mil")
    service = start_service(
        "ensemble",
        model_uri="models:/marrowscope-ensemble@test-mil-ens",
        mil_model_uri="models:/marrowscope-mil@test-mil",
    )
    service.version, service.mil_version = ens, mil
    return service


def test_mil_is_its_own_model_beside_the_ensemble(client, service, dirs):
    check_server_and_metadata(
        client, "mil", service.mil_version, {"CELL_EMBEDDINGS": ("FP32", [-1, D])}
    )
    md = client.get_model_metadata("mil")
    assert {t.name: (t.datatype, list(t.shape)) for t in md.outputs} == {
        "P_APL": ("FP32", [1]),
        "ATTENTION": ("FP32", [-1]),
    }
    assert service.health("mil") == service.health("ensemble") == service.health()
    # the ensemble still answers as before
    names = list(case_feature_names())
    r = client.infer(
        "ensemble",
        [
            infer_input("FEATURES", np.zeros((1, len(names)), np.float32), "FP32"),
            infer_input("FEATURE_NAMES", np.array([n.encode() for n in names], object), "BYTES"),
        ],
    )
    assert r.get_response().model_version == service.version


def test_infer_matches_in_process_with_lineage(client, service, dirs):
    bag = np.random.default_rng(0).normal(size=(23, D)).astype(np.float32)
    r = client.infer("mil", [infer_input("CELL_EMBEDDINGS", bag, "FP32")])
    assert r.get_response().model_version == service.mil_version
    params = r.get_response().parameters
    assert params["lineage_celltype"].string_param == "3"
    assert params["lineage_celltype_model"].string_param == "marrowscope-celltype"
    p, attention = r.as_numpy("P_APL"), r.as_numpy("ATTENTION")
    assert p.shape == (1,) and 0 <= p[0] <= 1
    assert attention.shape == (23,) and attention.sum() == pytest.approx(1.0, abs=1e-5)
    in_process = load_model(dirs["mil"])
    assert isinstance(in_process.module, MilFoldEnsemble) and len(in_process.module.members) == 3
    want_p, want_a = MilPredictor(in_process).predict(bag)
    assert p[0] == pytest.approx(want_p, abs=1e-6)
    np.testing.assert_allclose(attention, want_a, atol=1e-6)


@pytest.mark.parametrize(
    ("bag", "match"),
    [
        (np.zeros((4, D + 1), np.float32), "CELL_EMBEDDINGS"),
        (np.zeros((0, D), np.float32), "at least one cell"),
        (np.full((2, D), np.inf, np.float32), "NaN or infinite"),
    ],
)
def test_bad_bags_are_invalid_argument(client, service, bag, match):
    with pytest.raises(InferenceServerException) as info:
        client.infer("mil", [infer_input("CELL_EMBEDDINGS", bag, "FP32")])
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
    assert match in info.value.message()
    check_still_healthy(service)


def test_without_a_mil_uri_there_is_no_mil_model(mlflow_server, start_service, dirs):
    plain = start_service("ensemble", model_uri="models:/marrowscope-ensemble@test-mil-ens")
    c = tc.InferenceServerClient(url=plain.address)
    try:
        assert c.is_model_ready("ensemble")
        with pytest.raises(InferenceServerException) as info:
            c.get_model_metadata("mil")
        assert status_of(info.value) == "NOT_FOUND"
    finally:
        c.close()
