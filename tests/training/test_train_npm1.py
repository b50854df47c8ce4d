"""NPM1 training: AML cases only, augmentation only on the training fold."""

from __future__ import annotations

import numpy as np
import torch

from tests.training.conftest import job_args
from training import npm1
from training.cli import JobConfig, load_job_config
from training.common_data import load_cases, read_rgb


def _records(tiny_cohort):
    return load_cases(tiny_cohort, JobConfig.of("npm1", load_job_config("npm1", "cpu-tiny")))


def test_only_aml_cases_with_known_status(tiny_cohort):
    records = _records(tiny_cohort)
    aml = npm1.aml_records(records)
    assert aml and all(r.aml_label == 1 and r.npm1_status in ("mutated", "wild_type") for r in aml)
    assert len(aml) < len(records)  # the controls were left out
    assert {r.npm1_label for r in aml} == {0, 1}


def test_augmentation_only_on_the_training_fold(tiny_cohort):
    from marrowscope.imaging import resize_for_model

    r = npm1.aml_records(_records(tiny_cohort))[0]
    size = (48, 64)
    plain = npm1.Npm1Images(tiny_cohort, [r], size, augment=False)
    expected = resize_for_model(read_rgb(tiny_cohort / r.image_paths[0]), size)
    for _ in range(2):  # deterministic and equal to the serving input
        x, y = plain[0]
        np.testing.assert_array_equal((x * 255).round().byte().permute(1, 2, 0).numpy(), expected)
        assert y.item() == r.npm1_label
    torch.manual_seed(0)
    aug = npm1.Npm1Images(tiny_cohort, [r], size, augment=True)
    a, b = aug[0][0], aug[0][0]
    assert a.shape == b.shape == (3, 48, 64)
    assert not torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_main_trains_and_reports_on_aml_test_cases(tiny_cohort, tmp_path, sqlite_tracking):
    records = _records(tiny_cohort)
    test_aml = [r for r in npm1.aml_records(records) if r.split == "test"]
    metrics = npm1.main(
        job_args(
            npm1,
            "--data",
            tiny_cohort,
            "--output",
            tmp_path,
            "--config",
            "cpu-tiny",
            "--no-register",
            "--tracking-uri",
            sqlite_tracking,
        )
    )
    assert metrics["n_pos"] + metrics["n_neg"] == len(test_aml)
    assert metrics["n_pos"] == sum(r.npm1_label == 1 for r in test_aml)
    assert {"auroc", "auroc_ci_low", "auroc_ci_high", "pr_auc", "brier", "accuracy"} <= set(metrics)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "npm1_calibration.png",
        "npm1_confusion.png",
        "npm1_pr.png",
        "npm1_roc.png",
    ]
