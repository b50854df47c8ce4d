"""Ensemble service as a real process: P(AML), feature-name checks, lineage and feature-unit
parameters, and the optional genetic outputs (P_NPM1, P_APL) of a multi-target model (per
version, hot reload)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from marrowscope.features import case_feature_names
from marrowscope.inference import EnsemblePredictor
from marrowscope.models import load_model
from services.ensemble.model import EnsembleHandler, lineage_of
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    register,
    set_alias,
    status_of,
)

ALIAS = "test-services-ensemble"
LINEAGE = {"segmentation": "7", "celltype": "9"}
NAMES = list(case_feature_names())
UNITS = {"length": "um", "um_per_px": [0.25, 0.3]}
TWO_ALIAS = "test-services-ensemble-two"
NPM1_THRESHOLD = 0.35


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(
        "ensemble", tmp_path_factory.mktemp("ens") / "m", feature_units=UNITS
    )


@pytest.fixture(scope="module")
def service(serve_registered, model_dir):
    return serve_registered("ensemble", model_dir, ALIAS, lineage=LINEAGE)


def _inputs(vector: np.ndarray, names: list[str]) -> list:
    return [
        infer_input("FEATURES", vector.reshape(1, -1).astype(np.float32), "FP32"),
        infer_input("FEATURE_NAMES", np.array([n.encode() for n in names], dtype=object), "BYTES"),
    ]


def test_infer_matches_in_process(client, service, model_dir):
    check_server_and_metadata(
        client,
        "ensemble",
        service.version,
        {"FEATURES": ("FP32", [1, -1]), "FEATURE_NAMES": ("BYTES", [-1])},
    )
    vector = np.random.default_rng(2).random(len(NAMES)).astype(np.float32)
    r = client.infer("ensemble", _inputs(vector, NAMES))
    assert r.get_response().model_version == service.version
    # an AML-only model: one output, in the metadata and in the answer, and no NPM1 parameter
    assert _outputs(client.get_model_metadata("ensemble")) == {"P_AML": ("FP32", [1])}
    assert [o.name for o in r.get_response().outputs] == ["P_AML"]
    assert "npm1_threshold" not in r.get_response().parameters
    p = r.as_numpy("P_AML")
    assert p.shape == (1,) and 0.0 <= p[0] <= 1.0
    expected = EnsemblePredictor(load_model(model_dir)).predict(NAMES, vector)
    assert p[0] == pytest.approx(expected, abs=1e-6)


def _outputs(metadata) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}


@pytest.fixture(scope="module")
def two_target(mlflow_server, start_service, tmp_path_factory):
    """A service on an alias that starts at a two-target (P(AML), P(NPM1 | AML)) version; an
    AML-only version is registered beside it for the hot-reload test."""
    root = tmp_path_factory.mktemp("ens-two")
    two_dir = make_tiny_model_dir(
        "ensemble",
        root / "two",
        seed=3,
        targets=["aml", "npm1"],
        feature_units=UNITS,
        hyperparameters={"npm1_score_threshold": NPM1_THRESHOLD},
    )
    aml_only = register(
        mlflow_server,
        "ensemble",
        make_tiny_model_dir("ensemble", root / "aml", seed=4),
        f"{TWO_ALIAS}-aml",
    )
    two = register(mlflow_server, "ensemble", two_dir, TWO_ALIAS, LINEAGE)
    service = start_service(
        "ensemble",
        model_uri=f"models:/marrowscope-ensemble@{TWO_ALIAS}",
        poll_interval_s=0.5,
        version_grace_s=60,
    )
    c = tc.InferenceServerClient(url=service.address)
    yield {"service": service, "client": c, "two": two, "aml_only": aml_only, "dir": two_dir}
    c.close()


def test_two_target_model_answers_p_npm1_beside_p_aml(two_target):
    client, two = two_target["client"], two_target["two"]
    md = client.get_model_metadata("ensemble")
    assert md.versions[0] == two
    assert _outputs(md) == {"P_AML": ("FP32", [1]), "P_NPM1": ("FP32", [1])}
    vectors = np.random.default_rng(5).random((2, len(NAMES))).astype(np.float32)
    expected = EnsemblePredictor(load_model(two_target["dir"])).predict_targets(NAMES, vectors)
    for k, vector in enumerate(vectors):
        r = client.infer("ensemble", _inputs(vector, NAMES))
        assert r.get_response().model_version == two
        p_aml, p_npm1 = r.as_numpy("P_AML"), r.as_numpy("P_NPM1")
        assert p_aml.shape == p_npm1.shape == (1,) and 0 <= p_npm1[0] <= 1
        assert p_aml[0] == pytest.approx(expected["aml"][k], abs=1e-6)
        assert p_npm1[0] == pytest.approx(expected["npm1"][k], abs=1e-6)
    assert not np.allclose(expected["aml"], expected["npm1"])  # two heads, not one copied
    params = r.get_response().parameters
    assert params["npm1_threshold"].string_param == str(NPM1_THRESHOLD)
    assert params["feature_length_unit"].string_param == "um"
    assert params["lineage_celltype"].string_param == "9"
    # a client may ask for one output only
    r = client.infer(
        "ensemble", _inputs(vectors[0], NAMES), outputs=[tc.InferRequestedOutput("P_NPM1")]
    )
    assert [o.name for o in r.get_response().outputs] == ["P_NPM1"]


def test_hot_reload_to_an_aml_only_version_drops_p_npm1(two_target, mlflow_server):
    """Metadata and answers follow the version: after the alias moves to an AML-only model,
    the current version has no P_NPM1, while the replaced one (named explicitly, within its
    grace period) still answers and describes both outputs."""
    client, two, aml_only = two_target["client"], two_target["two"], two_target["aml_only"]
    set_alias(mlflow_server, "ensemble", TWO_ALIAS, aml_only)
    deadline = time.monotonic() + 60
    while client.get_model_metadata("ensemble").versions[0] != aml_only:
        assert time.monotonic() < deadline, two_target["service"].log_tail()
        time.sleep(0.2)
    assert _outputs(client.get_model_metadata("ensemble")) == {"P_AML": ("FP32", [1])}
    vector = np.zeros(len(NAMES), np.float32)
    r = client.infer("ensemble", _inputs(vector, NAMES))
    assert r.get_response().model_version == aml_only
    assert [o.name for o in r.get_response().outputs] == ["P_AML"]
    assert "npm1_threshold" not in r.get_response().parameters
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            "ensemble", _inputs(vector, NAMES), outputs=[tc.InferRequestedOutput("P_NPM1")]
        )
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()

    old = client.get_model_metadata("ensemble", model_version=two)
    assert _outputs(old) == {"P_AML": ("FP32", [1]), "P_NPM1": ("FP32", [1])}
    r = client.infer("ensemble", _inputs(vector, NAMES), model_version=two)
    assert {o.name for o in r.get_response().outputs} == {"P_AML", "P_NPM1"}
    check_still_healthy(two_target["service"])


def test_npm1_threshold_parameter_rules(tmp_path):
    from services.ensemble.model import threshold_parameters

    assert threshold_parameters(
        {"targets": ["aml", "npm1"], "hyperparameters": {"npm1_score_threshold": 0.4}}
    ) == {"npm1_threshold": "0.4"}
    # no head, or no recorded threshold: the client keeps its own
    assert threshold_parameters({"hyperparameters": {"npm1_score_threshold": 0.4}}) == {}
    assert threshold_parameters({"targets": ["aml", "npm1"], "hyperparameters": {}}) == {}
    from marrowscope.errors import ModelNotReady

    for bad in (1.5, "0.4", True):
        with pytest.raises(ModelNotReady, match="npm1_score_threshold"):
            threshold_parameters(
                {"targets": ["aml", "npm1"], "hyperparameters": {"npm1_score_threshold": bad}}
            )


APL_THRESHOLD = 0.2


def test_model_with_the_apl_target_answers_p_apl(serve_registered, tmp_path_factory):
    """A three-target version (aml, npm1, apl) answers P_APL = P(APL | AML) from its own head,
    lists it in ModelMetadata, and sends the APL threshold it records (and no NPM1 one)."""
    model_dir = make_tiny_model_dir(
        "ensemble",
        tmp_path_factory.mktemp("ens-apl") / "three",
        seed=6,
        targets=["aml", "npm1", "apl"],
        feature_units=UNITS,
        hyperparameters={"apl_score_threshold": APL_THRESHOLD},
    )
    service = serve_registered("ensemble", model_dir, "test-services-ensemble-apl", LINEAGE)
    client = tc.InferenceServerClient(url=service.address)
    try:
        md = client.get_model_metadata("ensemble")
        assert _outputs(md) == {
            "P_AML": ("FP32", [1]),
            "P_NPM1": ("FP32", [1]),
            "P_APL": ("FP32", [1]),
        }
        vectors = np.random.default_rng(8).random((2, len(NAMES))).astype(np.float32)
        expected = EnsemblePredictor(load_model(model_dir)).predict_targets(NAMES, vectors)
        for k, vector in enumerate(vectors):
            r = client.infer("ensemble", _inputs(vector, NAMES))
            assert [o.name for o in r.get_response().outputs] == ["P_AML", "P_NPM1", "P_APL"]
            assert r.as_numpy("P_APL")[0] == pytest.approx(expected["apl"][k], abs=1e-6)
            assert r.as_numpy("P_NPM1")[0] == pytest.approx(expected["npm1"][k], abs=1e-6)
        assert not np.allclose(expected["apl"], expected["npm1"])  # its own head
        params = r.get_response().parameters
        assert params["apl_threshold"].string_param == str(APL_THRESHOLD)
        assert "npm1_threshold" not in params
    finally:
        client.close()


def test_threshold_parameters_of_every_head():
    from marrowscope.errors import ModelNotReady
    from services.ensemble.model import threshold_parameters

    hp = {"npm1_score_threshold": 0.4, "apl_score_threshold": 0.25}
    assert threshold_parameters({"targets": ["aml", "npm1", "apl"], "hyperparameters": hp}) == {
        "npm1_threshold": "0.4",
        "apl_threshold": "0.25",
    }
    # a threshold without its head is not sent
    assert threshold_parameters({"targets": ["aml", "apl"], "hyperparameters": hp}) == {
        "apl_threshold": "0.25"
    }
    with pytest.raises(ModelNotReady, match="apl_score_threshold"):
        threshold_parameters(
            {"targets": ["aml", "apl"], "hyperparameters": {"apl_score_threshold": 2}}
        )


def test_every_response_carries_the_lineage(client):
    vector = np.zeros(len(NAMES), np.float32)
    params = client.infer("ensemble", _inputs(vector, NAMES)).get_response().parameters
    assert {k: params[k].string_param for k in ("lineage_segmentation", "lineage_celltype")} == {
        "lineage_segmentation": "7",
        "lineage_celltype": "9",
    }
    assert {
        k: params[k].string_param
        for k in ("feature_length_unit", "feature_um_per_px_min", "feature_um_per_px_max")
    } == {
        "feature_length_unit": "um",
        "feature_um_per_px_min": "0.25",
        "feature_um_per_px_max": "0.3",
    }


def test_lineage_sources(tmp_path):
    assert lineage_of(
        {"marrowscope.lineage.segmentation": "3"},
        {"training": {"lineage": {"segmentation": "1", "celltype": "4"}}},
    ) == {"segmentation": "3", "celltype": "4"}
    assert lineage_of({}, {"training": {}}) == {"segmentation": "", "celltype": ""}
    # a local directory: no registry tags, the config's training.lineage is used
    from marrowscope.models.io import read_config
    from services.ensemble.config import EnsembleSettings

    local = make_tiny_model_dir("ensemble", tmp_path / "m", training={"lineage": {"celltype": "5"}})
    assert read_config(local)["training"]["lineage"] == {"celltype": "5"}
    handler = EnsembleHandler(local, EnsembleSettings())
    assert handler.response_parameters == {
        "lineage_segmentation": "",
        "lineage_celltype": "5",
        "feature_length_unit": "unknown",
        "feature_um_per_px_min": "",
        "feature_um_per_px_max": "",
    }


def test_config_without_feature_units_serves_as_unknown(tmp_path, caplog):
    """A model saved before configs recorded `feature_units` still loads and answers."""
    import json

    from services.ensemble.config import EnsembleSettings

    local = make_tiny_model_dir("ensemble", tmp_path / "old")
    config = json.loads((local / "config.json").read_text())
    del config["feature_units"]
    (local / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        handler = EnsembleHandler(local, EnsembleSettings())
    assert handler.response_parameters["feature_length_unit"] == "unknown"
    assert "no feature_units" in caplog.text
    handler.load()
    p = handler.infer(
        {
            "FEATURES": np.zeros((1, len(NAMES)), np.float32),
            "FEATURE_NAMES": np.array([n.encode() for n in NAMES], dtype=object),
        },
        {},
    )
    assert 0.0 <= float(p["P_AML"][0]) <= 1.0


@pytest.mark.parametrize(
    ("vector", "names"),
    [
        (np.zeros(len(NAMES)), NAMES[1:] + NAMES[:1]),
        (np.zeros(len(NAMES) - 1), NAMES[:-1]),
        (np.zeros(len(NAMES)), NAMES[:-1] + ["frac_XYZ"]),
        (np.zeros(len(NAMES) + 1), NAMES),
        (np.full(len(NAMES), np.nan), NAMES),
    ],
    ids=["order", "missing", "renamed", "count-mismatch", "nan"],
)
def test_feature_mismatch_is_invalid_argument(client, service, vector, names):
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", _inputs(np.asarray(vector, np.float32), names))
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
    check_still_healthy(service)
