"""Regression: the ensemble's grouped CV must pair each case with its own feature row."""

import numpy as np
import pytest

from training.cli import JobConfig, load_job_config
from training.data.manifest import CaseRecord
from training.ensemble import cross_validate


def test_cross_validation_learns_a_separable_signal(tmp_path):
    config = JobConfig.of(
        "ensemble",
        load_job_config("ensemble", "cpu-tiny", ["cv_folds=3", "epochs=60", "hidden=[8]"]),
    )
    rng = np.random.default_rng(0)
    labels = np.array([i % 2 for i in range(30)])
    records = [
        CaseRecord(f"C{i:03d}", f"P{i:03d}", ("x.png",), int(y)) for i, y in enumerate(labels)
    ]
    names = ("signal", "noise")
    table = np.stack([labels * 2.0 - 1.0 + rng.normal(0, 0.3, 30), rng.normal(0, 1, 30)], 1).astype(
        np.float32
    )
    metrics = cross_validate(config, names, table, records, tmp_path)
    assert metrics["cv_auroc_mean"] > 0.9, metrics


def _cohort(n: int, seed: int = 0):
    """Controls and AML cases (half NPM1-mutated, a few of unknown status) whose feature 0
    separates AML and feature 1 separates NPM1 among AML only; in controls feature 1 is
    high or low at random with an NPM1 status that contradicts it (it must be ignored)."""
    rng = np.random.default_rng(seed)
    records, rows = [], []
    for i in range(n):
        aml, mutated = i % 3 != 0, i % 2 == 0
        status = ("mutated" if mutated else "wild_type") if aml and i % 11 else "na"
        if not aml:
            status = "wild_type" if mutated else "mutated"  # nonsense on a control: never a label
        records.append(
            CaseRecord(f"C{i:03d}", f"P{i:03d}", ("x.png",), int(aml), npm1_status=status)
        )
        rows.append(
            [
                (2.0 if aml else -2.0) + rng.normal(0, 0.3),
                (2.0 if mutated else -2.0) + rng.normal(0, 0.3),
                rng.normal(0, 1),
            ]
        )
    return records, ("aml_signal", "npm1_signal", "noise"), np.array(rows, dtype=np.float32)


def test_cross_validation_reports_the_npm1_head_on_known_aml_cases(tmp_path):
    config = JobConfig.of(
        "ensemble",
        load_job_config(
            "ensemble", "cpu-tiny", ["cv_folds=3", "epochs=60", 'targets=["aml", "npm1"]']
        ),
    )
    records, names, table = _cohort(48)
    metrics = cross_validate(config, names, table, records, tmp_path)
    assert metrics["cv_auroc_mean"] > 0.9 and metrics["npm1_cv_auroc_mean"] > 0.9, metrics
    assert metrics["npm1_cv_folds"] == 3 and metrics["npm1_cv_auroc_std"] >= 0
    aml_only = JobConfig.of(
        "ensemble",
        load_job_config("ensemble", "cpu-tiny", ["cv_folds=3", "epochs=60", 'targets=["aml"]']),
    )
    assert not any(
        k.startswith("npm1_") for k in cross_validate(aml_only, names, table, records, tmp_path)
    )


def test_npm1_labels_exist_only_for_aml_cases_of_known_status():
    from training.ensemble import target_labels

    records, _, _ = _cohort(12)
    y = target_labels(records, ["aml", "npm1"])
    assert y.shape == (12, 2) and y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 0], [r.aml_label for r in records])
    for r, label in zip(records, y[:, 1], strict=True):
        if r.aml_label == 1 and r.npm1_status != "na":
            assert label == (r.npm1_status == "mutated"), r
        else:  # every control (whatever its row says) and AML of unknown status
            assert np.isnan(label), r
    assert target_labels(records, ["aml"]).shape == (12, 1)


def test_masked_loss_ignores_controls_and_unknown_status():
    import torch
    import torch.nn.functional as F

    from training.ensemble import ensemble_loss

    labels = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [1.0, 0.0], [1.0, float("nan")]])
    logits = torch.tensor([[-1.0, 5.0], [2.0, 0.5], [0.3, -0.7], [1.0, -4.0]], requires_grad=True)
    loss = ensemble_loss(logits, labels)
    expected = F.binary_cross_entropy_with_logits(
        logits[:, 0], labels[:, 0]
    ) + F.binary_cross_entropy_with_logits(logits[1:3, 1], labels[1:3, 1])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[3, 1] == 0  # control, unknown status
    assert logits.grad[1, 1] != 0 and logits.grad[2, 1] != 0 and (logits.grad[:, 0] != 0).all()
    # whatever the NPM1 logit of a masked row, the loss is the same
    moved = logits.detach().clone()
    moved[0, 1], moved[3, 1] = -30.0, 30.0
    torch.testing.assert_close(ensemble_loss(moved, labels), expected.detach())
    # a batch without a known NPM1 status: AML loss only; a single-target net: plain BCE
    torch.testing.assert_close(
        ensemble_loss(logits[[0, 3]], labels[[0, 3]]),
        F.binary_cross_entropy_with_logits(logits[[0, 3], 0], labels[[0, 3], 0]),
    )
    torch.testing.assert_close(
        ensemble_loss(logits[:, 0], labels[:, 0]),
        F.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0]),
    )


def test_npm1_target_without_npm1_labels_is_refused_with_the_fix():
    from training.cli import UsageError
    from training.ensemble import check_target_labels

    records, _, _ = _cohort(12)
    train = [r.with_split("train") for r in records]
    check_target_labels(train, ["aml", "npm1"], "d")
    unknown = [
        CaseRecord(r.case_id, r.patient_id, r.image_paths, r.aml_label, split="train")
        for r in records
    ]
    with pytest.raises(
        UsageError, match=r"no AML case with a known NPM1 status.*--set 'targets=\[\"aml\"\]'"
    ):
        check_target_labels(unknown, ["aml", "npm1"], "d")
    one_state = [
        CaseRecord(
            r.case_id,
            r.patient_id,
            r.image_paths,
            r.aml_label,
            npm1_status="mutated" if r.aml_label else "na",
            split="train",
        )
        for r in records
    ]
    with pytest.raises(UsageError, match="only mutated NPM1"):
        check_target_labels(one_state, ["aml", "npm1"], "d")
    check_target_labels(unknown, ["aml"], "d")  # AML only: nothing to check


def test_bad_targets_are_a_usage_error():
    from training.cli import UsageError
    from training.ensemble import job_targets

    assert job_targets(JobConfig.of("ensemble", load_job_config("ensemble", "cpu-tiny"))) == [
        "aml",
        "npm1",
    ]
    assert job_targets(JobConfig.of("ensemble", {"seed": 0})) == [
        "aml"
    ]  # config files without the key
    with pytest.raises(UsageError, match="targets must start with 'aml'"):
        job_targets(
            JobConfig.of("ensemble", load_job_config("ensemble", "cpu-tiny", ['targets=["npm1"]']))
        )
