"""Segmentation -> celltype -> ensemble through a real MLflow server: registered versions
carry metric tags, the data hash and the ensemble's lineage."""

from __future__ import annotations

import pytest

from tests import fixtures_mlflow
from tests.training.conftest import job_args
from training import celltype, ensemble, segmentation
from training.cli import UsageError

mlflow_server = fixtures_mlflow.mlflow_server


def _latest(client, kind: str):
    from marrowscope import registry

    versions = client.search_model_versions(f"name='{registry.registered_name(kind)}'")
    return max(versions, key=lambda v: int(v.version))


def test_ensemble_trains_on_registered_upstream_versions(tiny_cohort, tmp_path, mlflow_server):
    from marrowscope import registry
    from training.common_data import data_hash

    common = ["--data", tiny_cohort, "--config", "cpu-tiny", "--tracking-uri", mlflow_server]
    # an untrained detector scores below 0.9 everywhere: no cells, so the feature pass is quick
    # (analyse_case itself is covered in tests/test_inference.py)
    seg = segmentation.main(
        job_args(
            segmentation, *common, "--output", tmp_path / "seg", "--set", "score_threshold=0.9"
        )
    )
    cel = celltype.main(job_args(celltype, *common, "--output", tmp_path / "cel"))
    client = registry.get_client(mlflow_server)
    seg_v, cel_v = _latest(client, "segmentation"), _latest(client, "celltype")
    assert float(seg_v.tags["marrowscope.metric.map50"]) == pytest.approx(seg["map50"])
    assert float(cel_v.tags["marrowscope.metric.macro_f1"]) == pytest.approx(cel["macro_f1"])
    assert seg_v.tags["marrowscope.data_hash"] == data_hash(tiny_cohort)

    metrics = ensemble.main(
        job_args(
            ensemble,
            *common,
            "--output",
            tmp_path / "ens",
            "--set",
            "score_threshold=0.0",
            "--segmentation",
            f"models:/marrowscope-segmentation/{seg_v.version}",
            "--celltype",
            f"models:/marrowscope-celltype/{cel_v.version}",
        )
    )
    ens_v = _latest(client, "ensemble")
    assert ens_v.tags["marrowscope.lineage.segmentation"] == seg_v.version
    assert ens_v.tags["marrowscope.lineage.celltype"] == cel_v.version
    for name in ("auroc", "auroc_ci_low", "auroc_ci_high", "pr_auc", "brier", "accuracy"):
        assert float(ens_v.tags[f"marrowscope.metric.{name}"]) == pytest.approx(metrics[name])
    assert metrics["auroc_ci_low"] <= metrics["auroc"] <= metrics["auroc_ci_high"]
    # cpu-tiny's targets ["aml", "npm1"]: the NPM1 head is scored on the test AML cases of
    # known status under every AML metric name prefixed npm1_
    from training.evaluate_metrics import binary_report

    aml_names = set(binary_report([0, 1], [0.2, 0.8], n_boot=2))
    assert {f"npm1_{k}" for k in aml_names} <= set(metrics)
    assert set(metrics) - aml_names == {f"npm1_{k}" for k in aml_names}  # cv_folds 0: no CV names
    for name in ("npm1_auroc", "npm1_auroc_ci_low", "npm1_pr_auc", "npm1_brier", "npm1_accuracy"):
        assert float(ens_v.tags[f"marrowscope.metric.{name}"]) == pytest.approx(metrics[name])
    assert metrics["npm1_auroc_ci_low"] <= metrics["npm1_auroc"] <= metrics["npm1_auroc_ci_high"]
    assert metrics["npm1_threshold"] == 0.5 and metrics["threshold"] == 0.0
    from training.cli import JobConfig, load_job_config
    from training.common_data import load_cases

    test = [
        r
        for r in load_cases(
            tiny_cohort, JobConfig.of("ensemble", load_job_config("ensemble", "cpu-tiny"))
        )
        if r.split == "test"
    ]
    assert metrics["npm1_n_pos"] == sum(
        r.aml_label == 1 and r.npm1_status == "mutated" for r in test
    )
    assert metrics["npm1_n_neg"] == sum(
        r.aml_label == 1 and r.npm1_status == "wild_type" for r in test
    )
    assert metrics["n_pos"] + metrics["n_neg"] == len(test)
    run = client.get_run(ens_v.run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/aml_roc.png", "plots/aml_pr.png", "plots/aml_calibration.png"} <= artifacts
    assert {
        "plots/npm1_roc.png",
        "plots/npm1_pr.png",
        "plots/npm1_calibration.png",
        "plots/npm1_confusion.png",
    } <= artifacts
    # features are cached per upstream versions and reused
    assert list((tmp_path / "ens").glob(f"features-*-seg{seg_v.version}-cel{cel_v.version}.npz"))
    # the config records the unit its morphometric features were learned in
    from marrowscope.models import read_config
    from training.data.synth_cohort import SynthConfig

    scale = SynthConfig().um_per_px
    units = read_config(tmp_path / "ens" / "model")["feature_units"]
    assert units == {"length": "um", "um_per_px": [pytest.approx(scale), pytest.approx(scale)]}
    # the config records its outputs and serves both
    from marrowscope.models import load_model

    loaded = load_model(tmp_path / "ens" / "model")
    assert loaded.config["targets"] == ["aml", "npm1"] and list(
        loaded.module.predict_targets(loaded.module.feature_mean[None])
    ) == ["aml", "npm1"]
    import json

    assert json.loads(ens_v.tags["marrowscope.config"])["targets"] == ["aml", "npm1"]


def test_npm1_target_on_data_without_npm1_status_names_the_fix(tiny_cohort, tmp_path):
    """A cohort whose manifest has no NPM1 status: refused before any model is loaded."""
    import csv
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data, ignore=shutil.ignore_patterns("images"))
    with (data / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r["npm1_status"] == "mutated" for r in rows)
    for r in rows:
        r["npm1_status"] = "na"
    with (data / "cases.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = job_args(
        ensemble,
        "--data",
        data,
        "--output",
        tmp_path / "o",
        "--config",
        "cpu-tiny",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'none.db'}",
    )
    with pytest.raises(
        UsageError, match=r"no AML case with a known NPM1 status.*--set 'targets=\[\"aml\"\]'"
    ):
        ensemble.main(args)
    assert not (tmp_path / "o").exists() and not (tmp_path / "none.db").exists()


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
    args = job_args(
        ensemble,
        "--data",
        tiny_cohort,
        "--output",
        tmp_path / "o",
        "--config",
        "cpu-tiny",
        "--segmentation",
        str(tmp_path),
        "--celltype",
        "models:/marrowscope-celltype/1",
    )
    with pytest.raises(UsageError, match="lineage needs a registered version"):
        ensemble.main(args)
    assert not (tmp_path / "o").exists()
