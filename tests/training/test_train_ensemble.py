"""Segmentation -> celltype -> ensemble through a real MLflow server: registered versions
carry metric tags, the data hash and the ensemble's lineage."""

from __future__ import annotations

import pytest

from tests import fixtures_mlflow
from tests.training.conftest import job_args
from training import celltype, ensemble, segmentation
from training.common import UsageError

mlflow_server = fixtures_mlflow.mlflow_server


def _latest(client, kind: str):
    from marrowscope import registry

    versions = client.search_model_versions(f"name='{registry.registered_name(kind)}'")
    return max(versions, key=lambda v: int(v.version))


def test_ensemble_trains_on_registered_upstream_versions(tiny_cohort, tmp_path, mlflow_server):
    from marrowscope import registry
    from training.common import data_hash

    common = ["--data", tiny_cohort, "--config", "cpu-tiny", "--tracking-uri", mlflow_server]
    # an untrained detector scores below 0.9 everywhere: no cells, so the feature pass is quick
    # (analyse_case itself is covered in tests/test_inference.py)
    seg = segmentation.main(job_args(segmentation, *common, "--output", tmp_path / "seg",
                                     "--set", "score_threshold=0.9"))
    cel = celltype.main(job_args(celltype, *common, "--output", tmp_path / "cel"))
    client = registry.get_client(mlflow_server)
    seg_v, cel_v = _latest(client, "segmentation"), _latest(client, "celltype")
    assert float(seg_v.tags["marrowscope.metric.map50"]) == pytest.approx(seg["map50"])
    assert float(cel_v.tags["marrowscope.metric.macro_f1"]) == pytest.approx(cel["macro_f1"])
    assert seg_v.tags["marrowscope.data_hash"] == data_hash(tiny_cohort)

    metrics = ensemble.main(job_args(
        ensemble, *common, "--output", tmp_path / "ens", "--set", "score_threshold=0.0",
        "--segmentation", f"models:/marrowscope-segmentation/{seg_v.version}",
        "--celltype", f"models:/marrowscope-celltype/{cel_v.version}"))
    ens_v = _latest(client, "ensemble")
    assert ens_v.tags["marrowscope.lineage.segmentation"] == seg_v.version
    assert ens_v.tags["marrowscope.lineage.celltype"] == cel_v.version
    for name in ("auroc", "auroc_ci_low", "auroc_ci_high", "pr_auc", "brier", "accuracy"):
        assert float(ens_v.tags[f"marrowscope.metric.{name}"]) == pytest.approx(metrics[name])
    assert metrics["auroc_ci_low"] <= metrics["auroc"] <= metrics["auroc_ci_high"]
    run = client.get_run(ens_v.run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/aml_roc.png", "plots/aml_pr.png", "plots/aml_calibration.png"} <= artifacts
    # features are cached per upstream versions and reused
    assert list((tmp_path / "ens").glob(f"features-*-seg{seg_v.version}-cel{cel_v.version}.npz"))
    # the config records the unit its morphometric features were learned in
    from marrowscope.models import read_config
    from training.data.synth_cohort import SynthConfig

    scale = SynthConfig().um_per_px
    units = read_config(tmp_path / "ens" / "model")["feature_units"]
    assert units == {"length": "um", "um_per_px": [pytest.approx(scale), pytest.approx(scale)]}


def test_training_feature_units_follow_the_pixel_sizes(tiny_cohort, tmp_path):
    """um when every image has a pixel size, px when none has, refused when mixed."""
    import json
    import shutil

    from training.data.manifest import read_manifest

    records = read_manifest(tiny_cohort / "cases.csv")
    assert ensemble.training_feature_units(tiny_cohort, records)["length"] == "um"

    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data, ignore=shutil.ignore_patterns("images"))
    coco = json.loads((data / "annotations.json").read_text())
    for im in coco["images"]:
        im.pop("um_per_px", None)
    (data / "annotations.json").write_text(json.dumps(coco))
    assert ensemble.training_feature_units(data, records) == {"length": "px", "um_per_px": None}
    coco["images"][0]["um_per_px"] = 0.3
    (data / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(UsageError, match="have no pixel size"):
        ensemble.training_feature_units(data, records)


def test_local_upstream_needs_no_register(tiny_cohort, tmp_path):
    args = job_args(ensemble, "--data", tiny_cohort, "--output", tmp_path / "o", "--config", "cpu-tiny",
                    "--segmentation", str(tmp_path), "--celltype", "models:/marrowscope-celltype/1")
    with pytest.raises(UsageError, match="lineage needs a registered version"):
        ensemble.main(args)
    assert not (tmp_path / "o").exists()
