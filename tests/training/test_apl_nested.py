"""Nested CV, calibration, instance dropout, the fold-ensemble MIL and the stability
figure's pieces of the APL experiment, on tiny SYNTHETIC inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.apl_cv import (
    NestedRun,
    OuterFold,
    calibrated,
    expected_calibration_error,
    fit_platt,
    nested_cv,
    nested_folds,
    repeated_grouped_cv,
    sample_instances,
    summarise,
)
from training.apl_models import AplData, LogisticCandidate, MilCandidate, combined_run


def _cohort(n: int = 30, cells: int = 24, seed: int = 0) -> AplData:
    """SYNTHETIC patients: every third is positive and holds 6 cells shifted on two
    features; the case vector is a noisy bag mean."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    bags = []
    for label in y:
        b = rng.normal(0, 1, (cells, 6)).astype(np.float32)
        if label:
            b[:6, :2] += 2.5
        bags.append(b)
    case = np.stack([b[:, :2].mean(0) for b in bags]) + rng.normal(0, 0.3, (n, 2))
    return AplData(y, bags, case)


def test_inner_folds_never_hold_outer_test_patients_and_outer_folds_match_plain_cv():
    y = np.array([0, 0, 1] * 10)
    groups = np.array([f"P{i}" for i in range(30)])
    outer = nested_folds(y, groups, folds=5, repeats=2, inner_folds=3, seed=4)
    assert len(outer) == 10
    plain: list[set] = []
    repeated_grouped_cv(
        y, groups, lambda tr, te, s: plain.append(set(te)) or np.zeros(len(te)), repeats=2, seed=4
    )
    assert [set(f.test) for f in outer] == plain  # the same held-out patients as plain CV
    for fold in outer:
        test_groups = set(groups[fold.test])
        assert len(fold.inner) == 3
        inner_val = np.concatenate([va for _, va in fold.inner])
        assert sorted(inner_val) == sorted(fold.train)  # inner folds partition outer-train
        for tr, va in fold.inner:
            assert not (set(groups[tr]) | set(groups[va])) & test_groups
            assert not set(groups[tr]) & set(groups[va])


def test_nested_cv_refuses_an_inner_fold_with_outer_test_rows():
    data = _cohort(12)
    leaky = OuterFold(0, 0, np.arange(8), np.arange(8, 12), [(np.arange(4), np.arange(4, 12))])
    with pytest.raises(AssertionError, match="outer-test"):
        nested_cv(data, data.y, LogisticCandidate("x", "case"), [leaky])


def test_temperature_scaling_repairs_overconfident_scores():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    true_logit = np.where(y, 1.0, -1.0) + rng.normal(0, 1.2, 400)
    overconfident = 6.0 * true_logit + 2.0  # what an overfitted MIL gives: saturated
    raw = calibrated(overconfident, 1.0, 0.0)
    t, b = fit_platt(overconfident, y)
    assert t > 3  # it recognises the logits are ~6x too large
    fixed = calibrated(overconfident, t, b)
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, raw) / 2
    assert np.mean((fixed < 0.01) | (fixed > 0.99)) < np.mean((raw < 0.01) | (raw > 0.99))
    # ranking is untouched (a monotone map)
    assert (np.argsort(fixed) == np.argsort(overconfident)).all()


def test_instance_dropout_and_sampling():
    rng = np.random.default_rng(0)
    kept = [len(sample_instances(200, rng, max_cells=500, instance_dropout=0.5)) for _ in range(50)]
    assert 80 < np.mean(kept) < 120
    assert all(
        len(sample_instances(200, rng, max_cells=30, instance_dropout=0.5)) == 30 for _ in range(5)
    )
    assert len(sample_instances(1, rng, max_cells=30, instance_dropout=0.99)) == 1
    rows = sample_instances(50, rng, max_cells=50, instance_dropout=0.0)
    assert rows.tolist() == list(range(50))
    with pytest.raises(ValueError, match="instance_dropout"):
        sample_instances(5, rng, max_cells=5, instance_dropout=1.0)


def test_logistic_candidate_chooses_c_inside_and_gives_probabilities():
    data = _cohort(30)
    outer = nested_folds(data.y, [f"P{i}" for i in range(30)], folds=3, repeats=1, inner_folds=3)
    run = nested_cv(data, data.y, LogisticCandidate("case", "case"), outer)
    s = summarise(data.y, run.oof, n_boot=50)
    assert s["auroc_mean"] > 0.8 and 0 < s["score_min"] <= s["score_max"] < 1
    assert all(m.choice["C"] in (0.001, 0.01, 0.1, 1.0) for _, m in run.fitted)
    # rescoring the same data with the same fold models reproduces the out-of-fold scores
    np.testing.assert_allclose(run.rescore(data), run.oof)


def test_mil_fold_ensemble_candidate_early_stops_and_averages_inner_models():
    from marrowscope.models.mil import MilFoldEnsemble

    data = _cohort(24, cells=16)
    outer = nested_folds(data.y, [f"P{i}" for i in range(24)], folds=2, repeats=1, inner_folds=2)
    mil = MilCandidate(instance_dropouts=(0.0, 0.5), max_epochs=6, every=3, max_cells=12)
    run = nested_cv(data, data.y, mil, outer)
    for _, fitted in run.fitted:
        assert isinstance(fitted.model, MilFoldEnsemble) and len(fitted.model.members) == 2
        assert fitted.choice["epochs"] in (3, 6)
        assert fitted.choice["instance_dropout"] in (0.0, 0.5)
        assert fitted.choice["temperature"] > 0
    assert ((run.oof > 0) & (run.oof < 1)).all()
    both = combined_run([run, run])
    np.testing.assert_allclose(both.oof, run.oof)
    np.testing.assert_allclose(both.rescore(data), run.oof, atol=1e-12)


def test_combined_runs_must_share_folds():
    data = _cohort(12)
    a = NestedRun(np.zeros((1, 12)))
    b = NestedRun(np.zeros((1, 12)))
    fold = OuterFold(0, 0, np.arange(6), np.arange(6, 12), [])
    a.fitted.append((fold, None))
    b.fitted.append((OuterFold(0, 0, np.arange(6), np.arange(6, 12), []), None))
    with pytest.raises(ValueError, match="same outer folds"):
        combined_run([a, b])
    assert data.pooled.shape == (12, 6)


def test_saved_fold_ensemble_round_trip_is_exact(tmp_path):
    from marrowscope.inference import MilPredictor
    from marrowscope.models import load_model, read_config
    from marrowscope.models.mil import MilFoldEnsemble
    from training.apl_cv import save_mil, train_mil

    data = _cohort(12, cells=10)
    members = [train_mil(data.bags, data.y, seed=s, epochs=2) for s in (0, 1, 2)]
    model = MilFoldEnsemble(members, temperature=2.5, bias=-0.4).eval()
    celltype = {"name": "marrowscope-celltype", "version": "6"}
    directory = save_mil(model, tmp_path / "mil", celltype=celltype)
    config = read_config(directory)
    assert config["members"] == 3
    assert config["calibration"] == {"temperature": 2.5, "bias": -0.4}
    served = MilPredictor(load_model(directory))
    bag = data.bags[0]
    p, attention = served.predict(bag)
    with torch.inference_mode():
        logits = [float(m(torch.as_tensor(bag))[0]) for m in members]
        want = torch.sigmoid(torch.tensor(np.mean(logits) / 2.5 - 0.4)).item()
    assert p == pytest.approx(want, abs=1e-6)
    assert attention.shape == (10,) and attention.sum() == pytest.approx(1.0, abs=1e-5)
    # one member at T = 1 differs: the artifact really carries members and temperature
    single = MilPredictor(load_model(save_mil(members[0], tmp_path / "one", celltype=celltype)))
    assert abs(single.predict(bag)[0] - p) > 1e-4


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"members": 0}, "members"),
        ({"calibration": {"temperature": 0.0, "bias": 0.0}}, "calibration"),
        ({"calibration": {"temperature": 1.0}}, "calibration"),
    ],
)
def test_bad_fold_ensemble_configs_are_refused(fields, match):
    from marrowscope.models import make_config
    from marrowscope.models.config import ModelConfigError

    with pytest.raises(ModelConfigError, match=match):
        make_config(
            "mil",
            "gated_attention",
            embedding_dim=4,
            celltype={"name": "marrowscope-celltype", "version": "1"},
            **fields,
        )


def test_stability_subset_and_shifted_arrays():
    from training.apl_stability import CellArrays, stability_table, subset_rows

    patients = ["A"] * 5 + ["B"] * 3
    keep = np.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
    morph = np.zeros((8, 2))
    morph[[2, 3, 7]] = 1.0  # measured cells come first
    rows = subset_rows(patients, keep, morph, 2)
    assert rows.tolist() == [2, 3, 5, 7]
    cells = CellArrays(np.zeros((8, 3)), np.zeros((8, 4)), morph, keep)
    shifted = cells.replaced(rows, np.ones((4, 3)), np.ones((4, 4)), np.full((4, 2), 7.0))
    assert shifted.keep.tolist() == [i in (2, 3, 5, 7) for i in range(8)]
    assert shifted.embeds[rows].min() == 1 and shifted.embeds[0].max() == 0
    assert cells.embeds.max() == 0  # the recorded arrays are untouched
    y = np.array([0, 1, 0, 1])
    ref = {"m": np.array([[0.1, 0.9, 0.2, 0.8]])}
    table = stability_table(y, ref, {"blur": {"m": np.array([[0.9, 0.1, 0.2, 0.8]])}})
    assert table["m"]["auroc_unshifted_subset"] == 1.0
    assert table["m"]["drop_by_shift"]["blur"] == 0.75 and not table["m"]["within_0_05"]


def test_the_experiment_end_to_end_on_a_tiny_synthetic_cohort(tmp_path):
    """SYNTHETIC cells (APL patients' cells are redder) through `training.apl.main` with a
    tiny untrained typer: every model is compared, the stability figure has each shift, the
    saved MIL is a calibrated fold ensemble, and the results hold no local paths."""
    from marrowscope.imaging import encode_png
    from marrowscope.models import read_config
    from tests.fixtures_mlflow import make_tiny_model_dir
    from training.apl import SIMPLEST_FIRST, get_args_parser, main

    root = tmp_path / "deepapl"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    patients, cells = ["patient_id,diagnosis,age,sex"], ["patient_id,cell_class,file"]
    for p in range(12):
        apl = p % 3 == 0
        patients.append(f"P{p},{'APL' if apl else 'AML'},40,F")
        for c in range(6):
            image = np.full((40, 40, 3), 220.0)
            image[10:30, 10:30] = (120 + 60 * apl, 60, 160)
            image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
            (root / f"images/p{p}c{c}.png").write_bytes(encode_png(image))
            cells.append(f"P{p},{'Promyelocyte' if apl else 'Lymphocyte'},images/p{p}c{c}.png")
    (root / "patients.csv").write_text("\n".join(patients) + "\n")
    (root / "cells.csv").write_text("\n".join(cells) + "\n")
    typer = make_tiny_model_dir("celltype", tmp_path / "typer")
    args = get_args_parser().parse_args(
        [
            *("--data", str(root), "--workdir", str(tmp_path / "w")),
            *("--celltype-model", str(typer), "--folds", "3", "--repeats", "1"),
            *("--inner-folds", "2", "--mil-epochs", "4", "--n-boot", "20"),
            *("--shifts", "blur,scale_down", "--shift-cells", "2", "--morph-cells", "3"),
            *("--results", str(tmp_path / "res/apl"), "--save-mil", str(tmp_path / "mil")),
        ]
    )
    report = main(args)
    assert set(SIMPLEST_FIRST) <= set(report["results"])
    assert report["choice"]["preferred"] in SIMPLEST_FIRST
    for name in SIMPLEST_FIRST:
        assert set(report["stability"]["by_model"][name]["auroc_by_shift"]) == {
            "blur",
            "scale_down",
        }
        assert 0 <= report["results"][name]["saturated_share"] <= 1
    # the served default: the mean-embedding logistic, calibrated, pinned to its typer
    config = read_config(tmp_path / "mil")
    assert config["arch"] == "mean_logistic" and config["calibration"]["temperature"] > 0
    assert report["served_model"]["run"] == "pooled_embedding_logistic"
    assert report["saved_mil"]["model"] == "pooled_embedding_logistic"
    for suffix in (".json", ".md"):
        text = (tmp_path / "res" / f"apl{suffix}").read_text()
        assert str(tmp_path) not in text and "MODEL_DIR" in text
