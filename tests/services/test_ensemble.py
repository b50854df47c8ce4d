"""Ensemble service as a real process: P(AML), feature-name checks, lineage and feature-unit
parameters."""

from __future__ import annotations

import numpy as np
import pytest
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
    status_of,
)

ALIAS = "test-services-ensemble"
LINEAGE = {"segmentation": "7", "celltype": "9"}
NAMES = list(case_feature_names())
UNITS = {"length": "um", "um_per_px": [0.25, 0.3]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("ensemble", tmp_path_factory.mktemp("ens") / "m",
                               feature_units=UNITS)


@pytest.fixture(scope="module")
def service(serve_registered, model_dir):
    return serve_registered("ensemble", model_dir, ALIAS, lineage=LINEAGE)



def _inputs(vector: np.ndarray, names: list[str]) -> list:
    return [infer_input("FEATURES", vector.reshape(1, -1).astype(np.float32), "FP32"),
            infer_input("FEATURE_NAMES", np.array([n.encode() for n in names], dtype=object),
                        "BYTES")]


def test_infer_matches_in_process(client, service, model_dir):
    check_server_and_metadata(client, "ensemble", service.version,
                              {"FEATURES": ("FP32", [1, -1]), "FEATURE_NAMES": ("BYTES", [-1])})
    vector = np.random.default_rng(2).random(len(NAMES)).astype(np.float32)
    r = client.infer("ensemble", _inputs(vector, NAMES))
    assert r.get_response().model_version == service.version
    p = r.as_numpy("P_AML")
    assert p.shape == (1,) and 0.0 <= p[0] <= 1.0
    expected = EnsemblePredictor(load_model(model_dir)).predict(NAMES, vector)
    assert p[0] == pytest.approx(expected, abs=1e-6)


def test_every_response_carries_the_lineage(client):
    vector = np.zeros(len(NAMES), np.float32)
    params = client.infer("ensemble", _inputs(vector, NAMES)).get_response().parameters
    assert {k: params[k].string_param for k in ("lineage_segmentation", "lineage_celltype")} \
        == {"lineage_segmentation": "7", "lineage_celltype": "9"}
    assert {k: params[k].string_param for k in ("feature_length_unit", "feature_um_per_px_min",
                                                 "feature_um_per_px_max")} \
        == {"feature_length_unit": "um", "feature_um_per_px_min": "0.25",
            "feature_um_per_px_max": "0.3"}


def test_lineage_sources(tmp_path):
    assert lineage_of({"marrowscope.lineage.segmentation": "3"},
                      {"training": {"lineage": {"segmentation": "1", "celltype": "4"}}}) \
        == {"segmentation": "3", "celltype": "4"}
    assert lineage_of({}, {"training": {}}) == {"segmentation": "", "celltype": ""}
    # a local directory: no registry tags, the config's training.lineage is used
    from marrowscope.models.io import read_config
    from services.ensemble.config import EnsembleSettings

    local = make_tiny_model_dir("ensemble", tmp_path / "m", training={"lineage": {"celltype": "5"}})
    assert read_config(local)["training"]["lineage"] == {"celltype": "5"}
    handler = EnsembleHandler(local, EnsembleSettings())
    assert handler.response_parameters == {
        "lineage_segmentation": "", "lineage_celltype": "5", "feature_length_unit": "unknown",
        "feature_um_per_px_min": "", "feature_um_per_px_max": ""}


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
    p = handler.infer({"FEATURES": np.zeros((1, len(NAMES)), np.float32),
                       "FEATURE_NAMES": np.array([n.encode() for n in NAMES], dtype=object)}, {})
    assert 0.0 <= float(p["P_AML"][0]) <= 1.0


@pytest.mark.parametrize(("vector", "names"), [
    (np.zeros(len(NAMES)), NAMES[1:] + NAMES[:1]),
    (np.zeros(len(NAMES) - 1), NAMES[:-1]),
    (np.zeros(len(NAMES)), NAMES[:-1] + ["frac_XYZ"]),
    (np.zeros(len(NAMES) + 1), NAMES),
    (np.full(len(NAMES), np.nan), NAMES),
], ids=["order", "missing", "renamed", "count-mismatch", "nan"])
def test_feature_mismatch_is_invalid_argument(client, service, vector, names):
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", _inputs(np.asarray(vector, np.float32), names))
    assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
    check_still_healthy(service)
