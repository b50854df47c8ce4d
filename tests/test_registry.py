"""Registry against a real `mlflow server`: register, tag, resolve by alias/version/dir."""

from __future__ import annotations

import json

import pytest
import torch

from marrowscope.errors import InvalidInput, ModelNotFound
from marrowscope.models import load_model, model_digest
from marrowscope.registry import (
    CHAMPION,
    alias_version,
    get_client,
    kind_of,
    register_model_dir,
    registered_name,
    resolve,
)
from tests import fixtures_mlflow
from tests.fixtures_mlflow import make_tiny_model_dir

mlflow_server = fixtures_mlflow.mlflow_server  # the session's real server (fixture)

NPM1 = registered_name("npm1")


@pytest.fixture(scope="module")
def npm1_dir(tmp_path_factory):
    return make_tiny_model_dir("npm1", tmp_path_factory.mktemp("npm1") / "m", seed=1)


def test_names_and_kinds():
    assert registered_name("segmentation") == "marrowscope-segmentation"
    assert kind_of("detector") == kind_of("marrowscope-segmentation") == "segmentation"
    with pytest.raises(InvalidInput, match="unknown registry kind"):
        registered_name("detector")


def test_register_tags_and_resolve(mlflow_server, npm1_dir, tmp_path):
    version = register_model_dir(
        "npm1",
        npm1_dir,
        metrics={"auroc": 0.81, "accuracy": 0.7},
        params={"epochs": 1, "lr": 1e-3},
        data_hash="abc123",
        lineage={},
        description="synthetic tiny model",
        tracking_uri=mlflow_server,
    )
    assert version.isdigit()
    mv = get_client(mlflow_server).get_model_version(NPM1, version)
    assert mv.tags["marrowscope.data_hash"] == "abc123"
    assert float(mv.tags["marrowscope.metric.auroc"]) == pytest.approx(0.81)
    assert json.loads(mv.tags["marrowscope.config"])["input_size"] == [64, 64]
    assert (
        len(mv.tags["marrowscope.git_commit"]) in (40, 7)
        or mv.tags["marrowscope.git_commit"] == "unknown"
    )
    assert mv.tags["marrowscope.digest"] == model_digest(npm1_dir)
    run = get_client(mlflow_server).get_run(mv.run_id)
    assert run.data.params["epochs"] == "1" and run.data.metrics["auroc"] == pytest.approx(0.81)

    by_version = resolve(
        f"models:/{NPM1}/{version}", tracking_uri=mlflow_server, cache_dir=tmp_path
    )
    assert by_version.version == version and by_version.name == NPM1
    assert by_version.metric("auroc") == pytest.approx(0.81)
    assert model_digest(by_version.local_dir) == model_digest(npm1_dir)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        load_model(by_version.local_dir).module(x), load_model(npm1_dir).module(x)
    )

    bare = resolve(version, name=NPM1, tracking_uri=mlflow_server, cache_dir=tmp_path)
    assert bare.local_dir == by_version.local_dir  # cached by name/version

    get_client(mlflow_server).set_registered_model_alias(NPM1, "staging", version)
    assert alias_version(NPM1, "staging", tracking_uri=mlflow_server) == version
    by_alias = resolve(f"models:/{NPM1}@staging", tracking_uri=mlflow_server, cache_dir=tmp_path)
    assert by_alias.version == version


def test_register_into_an_existing_run_and_lineage(mlflow_server, tmp_path):
    client = get_client(mlflow_server)
    exp = client.create_experiment("train-ensemble-test")
    run = client.create_run(exp)
    d = make_tiny_model_dir("ensemble", tmp_path / "ens")
    version = register_model_dir(
        "ensemble",
        d,
        metrics={"auroc": 0.9},
        params={},
        data_hash="h",
        lineage={"segmentation": "1", "celltype": "2"},
        run_id=run.info.run_id,
        tracking_uri=mlflow_server,
    )
    resolved = resolve(
        f"models:/marrowscope-ensemble/{version}",
        tracking_uri=mlflow_server,
        cache_dir=tmp_path / "cache",
    )
    assert resolved.lineage() == {"segmentation": "1", "celltype": "2"}
    assert client.get_model_version("marrowscope-ensemble", version).run_id == run.info.run_id


def test_register_rejects_bad_input(mlflow_server, npm1_dir, tmp_path):
    with pytest.raises(InvalidInput, match="holds a npm1 model"):
        register_model_dir(
            "celltype",
            npm1_dir,
            metrics={},
            params={},
            data_hash="h",
            lineage={},
            tracking_uri=mlflow_server,
        )
    with pytest.raises(InvalidInput, match="finite"):
        register_model_dir(
            "npm1",
            npm1_dir,
            metrics={"auroc": float("nan")},
            params={},
            data_hash="h",
            lineage={},
            tracking_uri=mlflow_server,
        )
    with pytest.raises(InvalidInput, match="lineage"):
        register_model_dir(
            "npm1",
            npm1_dir,
            metrics={},
            params={},
            data_hash="h",
            lineage={"detector": "x"},
            tracking_uri=mlflow_server,
        )
    with pytest.raises(InvalidInput, match="cannot register"):
        register_model_dir(
            "npm1",
            tmp_path,
            metrics={},
            params={},
            data_hash="h",
            lineage={},
            tracking_uri=mlflow_server,
        )


def test_unknown_versions_aliases_and_names(mlflow_server, tmp_path):
    with pytest.raises(ModelNotFound, match="version 9999"):
        resolve(f"models:/{NPM1}/9999", tracking_uri=mlflow_server, cache_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="alias 'nobody'"):
        alias_version(NPM1, "nobody", tracking_uri=mlflow_server)
    with pytest.raises(ModelNotFound):
        resolve(
            "models:/marrowscope-nonexistent@champion",
            tracking_uri=mlflow_server,
            cache_dir=tmp_path,
        )
    with pytest.raises(ModelNotFound):
        alias_version("marrowscope-nonexistent", CHAMPION, tracking_uri=mlflow_server)
    with pytest.raises(InvalidInput, match="malformed"):
        resolve("models:/a/b/c", tracking_uri=mlflow_server)
    with pytest.raises(InvalidInput, match="needs a model name"):
        resolve("3")
    with pytest.raises(ModelNotFound, match="neither"):
        resolve(str(tmp_path / "missing"))


def test_resolve_local_directory(npm1_dir, tmp_path):
    resolved = resolve(str(npm1_dir))
    digest = model_digest(npm1_dir)
    assert resolved.version == f"local-{digest[:12]}"
    assert resolved.name == NPM1 and resolved.local_dir == npm1_dir.resolve()
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelNotFound, match="not a loadable model directory"):
        resolve(str(tmp_path / "notamodel"))


def test_embedded_default_store(tmp_path, monkeypatch, npm1_dir):
    """Without a server: SQLite store, artifacts in `mlruns` next to the database."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register_model_dir(
        "npm1",
        npm1_dir,
        metrics={"auroc": 0.5},
        params={},
        data_hash="h",
        lineage={},
        tracking_uri=uri,
    )
    resolved = resolve(f"models:/{NPM1}/{version}", tracking_uri=uri, cache_dir=tmp_path / "c")
    assert (tmp_path / "mlruns").is_dir()
    assert model_digest(resolved.local_dir) == model_digest(npm1_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve(f"models:/{NPM1}/{version}", cache_dir=tmp_path / "c").version == version
