"""Regression: the ensemble's grouped CV must pair each case with its own feature row."""

import numpy as np

from training.common import JobConfig, load_job_config
from training.data.manifest import CaseRecord
from training.ensemble import cross_validate


def test_cross_validation_learns_a_separable_signal(tmp_path):
    config = JobConfig.of("ensemble", load_job_config(
        "ensemble", "cpu-tiny", ["cv_folds=3", "epochs=60", "hidden=[8]"]))
    rng = np.random.default_rng(0)
    labels = np.array([i % 2 for i in range(30)])
    records = [CaseRecord(f"C{i:03d}", f"P{i:03d}", ("x.png",), int(y)) for i, y in
               enumerate(labels)]
    names = ("signal", "noise")
    table = np.stack([labels * 2.0 - 1.0 + rng.normal(0, 0.3, 30),
                      rng.normal(0, 1, 30)], 1).astype(np.float32)
    metrics = cross_validate(config, names, table, records, tmp_path)
    assert metrics["cv_auroc_mean"] > 0.9, metrics
