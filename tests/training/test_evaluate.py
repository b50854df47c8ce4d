"""Evaluation functions on hand-made inputs with known answers, and the detection CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from marrowscope.errors import InvalidInput
from training.evaluate_detection import detection_map
from training.evaluate_metrics import binary_plots, binary_report, bootstrap_ci, celltype_report


def test_perfect_scores_give_auroc_one_and_known_brier():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    m = binary_report(y, s, n_boot=200)
    assert m["auroc"] == 1.0 and m["pr_auc"] == 1.0 and m["accuracy"] == 1.0
    assert m["brier"] == 0.0
    assert m["auroc_ci_low"] == m["auroc_ci_high"] == 1.0


def test_known_values_and_ci_contains_the_estimate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    s = np.clip(0.5 * y + rng.normal(0.25, 0.25, 100), 0, 1)
    m = binary_report(y, s, n_boot=500, threshold=0.5)
    from sklearn.metrics import roc_auc_score

    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["auroc_ci_low"] < m["auroc"] < m["auroc_ci_high"]
    assert m["pr_auc_ci_low"] < m["pr_auc"] < m["pr_auc_ci_high"]
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
    tp = int(((s >= 0.5) & (y == 1)).sum())
    assert m["sensitivity"] == pytest.approx(tp / 40)
    # inverted scores: AUROC 1 - a
    assert binary_report(y, 1 - s, n_boot=50)["auroc"] == pytest.approx(1 - m["auroc"])


def test_one_class_is_refused():
    with pytest.raises(InvalidInput, match="both classes"):
        binary_report([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(InvalidInput):
        bootstrap_ci([0, 0], [0.1, 0.2], lambda a, b: 0.0)


def test_celltype_report_known_values():
    m = celltype_report(
        ["BLA", "BLA", "LYT", "LYT"],
        ["BLA", "LYT", "LYT", "LYT"],
        {"auer_rod": np.array([0, 1, 0, 1])},
        {"auer_rod": np.array([0.1, 0.9, 0.2, 0.8])},
    )
    assert m["accuracy"] == 0.75
    assert m["f1_BLA"] == pytest.approx(2 / 3) and m["f1_LYT"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auroc_auer_rod"] == 1.0


def test_attribute_auroc_is_measured_among_the_cell_types_that_show_it():
    """A head that only recognises blasts scores well over all cells but 0.5 among blasts."""
    y = ["BLA"] * 4 + ["LYT"] * 4
    cup = np.array([1, 0, 1, 0, 0, 0, 0, 0])
    blast_detector = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    m = celltype_report(y, y, {"cup_like_nucleus": cup}, {"cup_like_nucleus": blast_detector})
    assert (
        m["auroc_all_cup_like_nucleus"] == pytest.approx(10 / 12)
        and m["auroc_cup_like_nucleus"] == 0.5
    )
    real = np.array([0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.1, 0.1])
    m = celltype_report(y, y, {"cup_like_nucleus": cup}, {"cup_like_nucleus": real})
    assert m["auroc_cup_like_nucleus"] == 1.0


def test_detection_map_is_one_for_ground_truth_and_zero_for_misses():
    gt = [
        (
            np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 5, 70, 30]], float),
            ["cell", "RBC", "RBC"],
        ),
        (np.array([[5, 5, 25, 25]], float), ["cell"]),
    ]
    perfect = [(b, np.ones(len(labels)), labels) for b, labels in gt]
    assert detection_map(gt, perfect, ["cell", "RBC"]) == {
        "ap50_cell": 1.0,
        "ap50_RBC": 1.0,
        "map50": 1.0,
    }
    # right boxes, wrong classes: AP 0; a box shifted to IoU < 0.5 is a miss too
    swapped = [
        (b, np.ones(len(labels)), ["RBC" if x == "cell" else "cell" for x in labels])
        for b, labels in gt
    ]
    assert detection_map(gt, swapped, ["cell", "RBC"])["map50"] == 0.0
    half = [
        (gt[0][0], np.ones(3), gt[0][1]),
        (np.array([[15, 15, 35, 35]], float), np.ones(1), ["cell"]),
    ]
    m = detection_map(gt, half, ["cell", "RBC"])
    assert m["ap50_RBC"] == 1.0 and m["ap50_cell"] == pytest.approx(0.5, abs=0.01)


def test_plots_are_png(tmp_path):
    paths = binary_plots([0, 1, 0, 1, 1], [0.1, 0.8, 0.3, 0.6, 0.4], tmp_path, prefix="x_")
    assert {p.name for p in paths} == {
        "x_roc.png",
        "x_pr.png",
        "x_calibration.png",
        "x_confusion.png",
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_detection_cli_last_line_is_json(tmp_path, tiny_cohort):
    from tests.fixtures_mlflow import make_tiny_model_dir

    model = make_tiny_model_dir(
        "segmentation", tmp_path / "m", classes=["cell", "RBC"], min_size=120, max_size=160
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "detection",
            "--model",
            str(model),
            "--data",
            str(tiny_cohort),
            "--config",
            "cpu-tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last["ap50"]) == {"cell", "RBC"} and 0.0 <= last["map50"] <= 1.0
    assert last["split"] == "test" and last["version"].startswith("local-")


def test_detection_cli_refuses_mismatched_classes(tmp_path, tiny_cohort):
    from tests.fixtures_mlflow import make_tiny_model_dir

    model = make_tiny_model_dir(
        "segmentation", tmp_path / "m", classes=["WBC", "Platelets"], min_size=120, max_size=160
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "detection",
            "--model",
            str(model),
            "--data",
            str(tiny_cohort),
            "--config",
            "cpu-tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "do not match the detector" in out.stderr


def test_ensemble_evaluation_reports_the_npm1_output(tmp_path, tiny_cohort):
    """An ensemble with targets ["aml", "npm1"]: AML names as before, the NPM1 head under
    npm1_* on the split's AML cases of known status, plots for both."""
    import argparse

    from marrowscope.inference import load_predictor
    from tests.fixtures_mlflow import make_tiny_model_dir
    from training.cli import JobConfig, load_job_config
    from training.common_data import load_cases
    from training.evaluate import evaluate_ensemble

    seg = make_tiny_model_dir(
        "segmentation", tmp_path / "seg", classes=["cell", "RBC"], min_size=120, max_size=160
    )
    cel = make_tiny_model_dir("celltype", tmp_path / "cel")
    ens = make_tiny_model_dir("ensemble", tmp_path / "ens", targets=["aml", "npm1"])
    config = JobConfig.of("ensemble", load_job_config("ensemble", "cpu-tiny"))
    args = argparse.Namespace(
        data=tiny_cohort,
        segmentation=str(seg),
        celltype=str(cel),
        tracking_uri=None,
        plots=tmp_path / "plots",
        mlflow=False,
    )
    metrics = evaluate_ensemble(load_predictor(str(ens)), args, "test", config, {})
    aml_names = set(binary_report([0, 1], [0.2, 0.8], n_boot=2))
    assert set(metrics) == aml_names | {f"npm1_{k}" for k in aml_names}
    test = [r for r in load_cases(tiny_cohort, config) if r.split == "test"]
    assert metrics["n_pos"] + metrics["n_neg"] == len(test)
    assert metrics["npm1_n_pos"] == sum(
        r.aml_label == 1 and r.npm1_status == "mutated" for r in test
    )
    assert metrics["npm1_n_neg"] == sum(
        r.aml_label == 1 and r.npm1_status == "wild_type" for r in test
    )
    assert {"aml_roc.png", "npm1_roc.png", "npm1_confusion.png"} <= {
        p.name for p in args._plot_paths
    }
    # an AML-only ensemble reports no npm1_* names
    aml_only = make_tiny_model_dir("ensemble", tmp_path / "aml")
    assert (
        set(evaluate_ensemble(load_predictor(str(aml_only)), args, "test", config, {})) == aml_names
    )
