"""The APL experiment's pieces on tiny synthetic inputs (SYNTHETIC data): the repeated
patient-grouped CV never splits a group, the summary is what it says, attention-MIL learns a
planted cell-level signal, and the DeepAPL reader reports and skips unreadable files."""

from __future__ import annotations

import numpy as np
import pytest

from training.apl_cv import (
    GatedAttentionMIL,
    logistic_fit_predict,
    mil_fit_predict,
    repeated_grouped_cv,
    summarise,
)
from training.data.deepapl import DEFAULT_ROOT as DEEPAPL


def test_grouped_cv_never_splits_a_group_and_scores_every_row_once_per_repeat():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i:02d}" for i in range(20)], 3)  # 3 rows per patient
    y = np.repeat(np.arange(20) % 4 == 0, 3).astype(int)
    seen: list[tuple[set, set]] = []

    def fit_predict(tr, te, fit_seed):
        seen.append((set(groups[tr]), set(groups[te])))
        assert len(np.unique(y[tr])) == 2  # stratified: both classes in every training fold
        return rng.random(len(te))

    oof = repeated_grouped_cv(y, groups, fit_predict, folds=5, repeats=3, seed=1)
    assert oof.shape == (3, 60) and not np.isnan(oof).any()
    assert len(seen) == 15
    for train_groups, test_groups in seen:
        assert not train_groups & test_groups
    # each repeat's test folds partition the patients
    for r in range(3):
        folds = [te for _, te in seen[r * 5 : (r + 1) * 5]]
        assert set().union(*folds) == set(groups) and sum(map(len, folds)) == 20
    # repeats reshuffle
    assert seen[0][1] != seen[5][1] or seen[1][1] != seen[6][1]


def test_grouped_cv_refuses_too_many_folds():
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 groups"):
        repeated_grouped_cv(np.array([0, 1, 0]), ["a", "b", "c"], lambda *a: None, folds=5)


def test_summary_of_a_separable_and_a_random_score():
    y = np.array([0] * 30 + [1] * 10)
    perfect = np.tile(y.astype(float), (4, 1))
    s = summarise(y, perfect, n_boot=200)
    assert s["auroc_mean"] == 1.0 and s["auroc_sd"] == 0.0 and s["auroc_ci95"] == [1.0, 1.0]
    noise = np.random.default_rng(0).random((4, 40))
    s = summarise(y, noise, n_boot=200)
    assert len(s["auroc_per_repeat"]) == 4 and s["auroc_sd"] > 0
    assert s["auroc_ci95"][0] < 0.5 < s["auroc_ci95"][1]


def test_logistic_baseline_through_the_cv():
    rng = np.random.default_rng(1)
    y = np.array([0] * 24 + [1] * 12)
    x = np.stack([y * 2.0 + rng.normal(0, 0.5, 36), rng.normal(0, 1, 36)], 1)
    oof = repeated_grouped_cv(y, [f"P{i}" for i in range(36)], logistic_fit_predict(x, y))
    assert summarise(y, oof, n_boot=100)["auroc_mean"] > 0.9


def _bags(n: int, seed: int = 0):
    """SYNTHETIC bags: positive patients hold ~10 % cells from a shifted cluster; bag means
    barely move, so the model has to find the few cells (what attention is for)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    bags = []
    for label in y:
        cells = rng.normal(0, 1, (40, 8)).astype(np.float32)
        if label:
            cells[:4, :2] += 4.0
        bags.append(cells)
    return bags, y


def test_attention_mil_learns_a_few_cell_signal_and_attends_to_those_cells():
    import torch

    from training.apl_cv import train_mil

    bags, y = _bags(36)
    oof = repeated_grouped_cv(
        y, [f"P{i}" for i in range(36)], mil_fit_predict(bags, y, epochs=15), folds=3, repeats=1
    )
    assert summarise(y, oof, n_boot=100)["auroc_mean"] > 0.85
    model = train_mil(bags, y, seed=0, epochs=15)
    assert isinstance(model, GatedAttentionMIL) and not model.training
    with torch.inference_mode():
        _, attention = model(torch.as_tensor(bags[0]))  # a positive patient
    assert attention.shape == (40,) and float(attention.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(attention[:4].sum()) > 4 / 40 * 2  # the planted cells get more than their share


def test_trained_mil_saves_as_a_registrable_model_pinned_to_its_celltype(tmp_path):
    from marrowscope.inference import MilPredictor
    from marrowscope.models import load_model, read_config
    from training.apl_cv import save_mil, train_mil

    bags, y = _bags(12)
    model = train_mil(bags, y, seed=0, epochs=2)
    celltype = {"name": "marrowscope-celltype", "version": "6"}
    directory = save_mil(model, tmp_path / "mil", celltype=celltype, training={"x": 1})
    config = read_config(directory)
    assert config["kind"] == "mil" and config["celltype"] == celltype
    assert config["embedding_dim"] == bags[0].shape[1] and config["training"] == {"x": 1}
    served = MilPredictor(load_model(directory))
    import torch

    with torch.inference_mode():
        logit, attention = model(torch.as_tensor(bags[3]))
    p, a = served.predict(bags[3])
    assert p == pytest.approx(float(torch.sigmoid(logit)), abs=1e-6)
    np.testing.assert_allclose(a, attention.numpy(), atol=1e-6)


def test_cohort_from_the_shared_reader_and_cells_decoded_once(tmp_path):
    from marrowscope.imaging import encode_png
    from training.apl import load_cells, read_cohort, sign_out_codes, sign_out_differential

    root = tmp_path / "deepapl"
    (root / "images").mkdir(parents=True)
    (root / "patients.csv").write_text(
        "patient_id,diagnosis,age,sex\nP1,APL,30,F\nP2,AML,40,M\nP3,AML,50,M\n"
    )
    image = np.full((64, 60, 3), 200, np.uint8)
    for name in ("a.png", "c.png"):
        (root / "images" / name).write_bytes(encode_png(image))
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "cells.csv").write_text(
        "patient_id,cell_class,file\n"
        'P1,Promyelocyte,images/a.png\nP1,"Blast, no lineage spec",images/b.png\n'
        "P2,,images/a.png\nP2,Smudge cells,images/c.png\n"
    )
    cohort = read_cohort(root)
    assert cohort.apl == {"P1": 1, "P2": 0}  # P3 has no cells; b.png is unreadable
    assert sign_out_codes(cohort) == ["PMO", None, "KSC"]
    (root / "images" / "c.png").write_bytes(b"broken since")  # turns bad after reading
    crops, half, keep = load_cells(cohort, 16, tmp_path / "cells.npz")
    assert crops.shape == (3, 16, 16, 3) and keep.tolist() == [True, True, False]
    assert crops[0].mean() == pytest.approx(200, abs=1)
    classes, diff = sign_out_differential(cohort)
    assert classes == ["Promyelocyte", "Smudge cells"]
    np.testing.assert_allclose(diff, [[1.0, 0.0], [0.0, 1.0]])


def test_reader_errors_are_usage_errors(tmp_path):
    from training.apl import read_cohort
    from training.cli import UsageError

    (tmp_path / "patients.csv").write_text("patient_id,diagnosis\nP1,CML\n")
    (tmp_path / "cells.csv").write_text("patient_id,cell_class,file\n")
    with pytest.raises(UsageError, match="'CML' is not one of"):
        read_cohort(tmp_path)
    with pytest.raises(UsageError):
        read_cohort(tmp_path / "absent")


@pytest.mark.real_data
@pytest.mark.skipif(not DEEPAPL.is_dir(), reason="real DeepAPL data not present (../shared/data)")
def test_real_deepapl_cohort_reads_as_documented():
    from training.apl import read_cohort, sign_out_codes

    cohort = read_cohort(DEEPAPL, verify=False)  # CSVs only: decoding 13k images is slow
    assert len(cohort.apl) == 81 and sum(cohort.apl.values()) == 21
    assert len(cohort.cells) > 10_000
    assert sum(c is not None for c in sign_out_codes(cohort)) > 10_000


def _mean_shift_bags(n: int, seed: int = 0):
    """SYNTHETIC bags whose mean embedding carries the label (what a logistic on the mean
    can learn)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    bags = [
        (rng.normal(0, 1, (int(rng.integers(5, 30)), 8)) + 0.8 * label).astype(np.float32)
        for label in y
    ]
    return bags, y


def test_mean_embedding_logistic_serves_exactly_what_the_cv_fitted(tmp_path):
    """The default served APL model: the nested-CV recipe fitted on every patient, saved as a
    `mil` model (arch mean_logistic) and loaded as the service loads it, answers the same
    calibrated probability as the fitted scikit-learn pipeline; its per-cell weights sum to 1
    and rank the cells by their own P(APL)."""
    from marrowscope.inference import MilPredictor
    from marrowscope.models import load_model, read_config
    from training.apl import mean_embedding_model
    from training.apl_cv import grouped_folds, save_mil
    from training.apl_models import AplData, LogisticCandidate

    bags, y = _mean_shift_bags(30)
    data = AplData(y, bags, np.zeros((len(y), 1)))
    everyone = np.arange(len(y))
    inner = grouped_folds(y, np.array([f"P{i}" for i in everyone]), everyone, folds=3, seed=0)
    fitted = LogisticCandidate("pooled_embedding_logistic", "pooled").fit(data, everyone, inner, 0)
    module, choice = mean_embedding_model(fitted)
    assert set(choice) == {"C", "temperature"}
    celltype = {"name": "marrowscope-celltype", "version": "3"}
    directory = save_mil(module, tmp_path / "mean", celltype=celltype)
    config = read_config(directory)
    assert config["arch"] == "mean_logistic" and config["celltype"] == celltype
    assert config["calibration"] == {"temperature": fitted.temperature, "bias": fitted.bias}
    served = MilPredictor(load_model(directory))
    expected = fitted.predict(data, everyone)
    got = [served.predict(b) for b in bags]
    np.testing.assert_allclose([p for p, _ in got], expected, rtol=1e-4, atol=1e-6)
    for bag, (_, weights) in zip(bags, got, strict=True):
        assert weights.shape == (len(bag),) and float(weights.sum()) == pytest.approx(1.0)
        own = np.array([served.predict(cell[None])[0] for cell in bag])
        np.testing.assert_array_equal(
            np.argsort(-weights, kind="stable"), np.argsort(-own, kind="stable")
        )
    assert summarise(y, np.asarray([[p for p, _ in got]]), n_boot=50)["auroc_mean"] > 0.9


def test_mean_logistic_config_refuses_members(tmp_path):
    from marrowscope.models import ModelConfigError, make_config

    with pytest.raises(ModelConfigError, match="one member"):
        make_config(
            "mil",
            "mean_logistic",
            embedding_dim=8,
            members=3,
            celltype={"name": "marrowscope-celltype", "version": "1"},
        )
