"""`training.results real` report: figures from predictions.npz, patient bootstrap, no
absolute paths in what is committed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from marrowscope.taxonomy import CODES
from training import evaluate_real, results
from training.celltype import CropSet, outputs, save_predictions


def _preds(path, *, n_pat=10, per=30, acc=0.8, seed=0, external=False):
    rng = np.random.default_rng(seed)
    classes = [CODES.index(c) for c in ("BLA", "LYT", "KSC")]
    y = rng.choice(classes, n_pat * per)
    wrong = rng.random(len(y)) > acc
    p = np.where(wrong, rng.choice(classes, len(y)), y)
    probs = np.full((len(y), len(outputs())), 0.01, np.float32)
    probs[np.arange(len(y)), p] = 0.9
    groups = np.repeat([f"P{i}" for i in range(n_pat)], per).astype(object)
    data = CropSet(np.zeros((len(y), 1, 1, 3), np.uint8), y, None, groups,
                   np.full(len(y), "deepapl", dtype=object))  # fmt: skip
    splits = {"test": (probs, data)}
    if external:
        ext = CropSet(data.crops, y, None, np.full(len(y), "", dtype=object),
                      np.full(len(y), "pbc", dtype=object))  # fmt: skip
        splits["external"] = (probs, ext)
    save_predictions(path, splits)
    return y, p


def test_report_figures_match_a_direct_computation(tmp_path):
    from sklearn.metrics import f1_score, recall_score

    y, p = _preds(tmp_path / "p.npz")
    rep = evaluate_real.real_report(tmp_path / "p.npz", min_cells=50, n_boot=200)
    assert rep["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    bla = CODES.index("BLA")
    assert rep["blast_recall"] == pytest.approx(recall_score(y == bla, p == bla))
    lo, hi = rep["macro_f1_ci"]
    assert lo < rep["macro_f1"] < hi and hi - lo < 0.3
    assert rep["n_patients"] == 10 and set(rep["classes_min_cells"]) == {"BLA", "LYT", "KSC"}
    # every answer has the same confidence (0.9 renormalised over the cell codes): ECE is
    # the gap between it and the accuracy
    assert rep["calibration"]["ece"] == pytest.approx(
        abs(0.9 / (0.9 + 0.01 * (len(CODES) - 1)) - rep["accuracy"]), abs=0.02
    )


def test_min_cells_leaves_small_classes_out(tmp_path):
    _preds(tmp_path / "p.npz", n_pat=2, per=30)
    rep = evaluate_real.real_report(tmp_path / "p.npz", min_cells=1000, n_boot=10)
    assert rep["classes_min_cells"] == [] and np.isnan(rep["macro_f1"])


def test_written_report_has_no_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "bench")
    work = tmp_path / "work"
    _preds(work / "real-cpu" / "predictions.npz")
    _preds(work / "xs-deepapl-none" / "predictions.npz", external=True, seed=1)
    data = results.shared_data_dir()
    runs = {
        "main": {"command": f"python -m training.celltype --data {data} --output "
                 f"{work / 'real-cpu'} --config real-cpu", "seconds": 600.0},
        "xs_deepapl_none": {"command": f"python -m training.celltype --data {data} --output "
                            f"{work / 'xs-deepapl-none'} --config real-cpu", "seconds": 60.0},
    }  # fmt: skip
    _preds(work / "real-cpu-split1" / "predictions.npz", seed=2, acc=0.6)
    runs["split_1"] = {"command": f"python -m training.celltype --data {data} --output "
                       f"{work / 'real-cpu-split1'} --config real-cpu --set split_seed=1",
                       "seconds": 600.0}  # fmt: skip
    results.write_real_report(work, runs, "cpu")
    md = (tmp_path / "bench" / "real_cells.md").read_text()
    js = (tmp_path / "bench" / "real_cells.json").read_text()
    for text in (md, js):
        assert str(tmp_path) not in text and str(data) not in text
    assert "--output DIR/real-cpu" in md and "--data ../shared/data" in md
    assert md.startswith("# Cell typer on real leukemic cells") and "**Real data.**" in md
    assert json.loads(js)["cross_source"]["xs_deepapl_none"]["shared_classes"]
    # the other split is its own row, scored from its own predictions (accuracy 0.6, not 0.8)
    other = json.loads(js)["other_splits"]["split_1"]
    main = json.loads(js)["test"]
    assert other["macro_f1"] < main["macro_f1"] - 0.1
    rows = [line for line in md.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and f"{other['macro_f1']:.3f}" in rows[1]
    assert "--output DIR/real-cpu-split1" in md
    # what the importers read, unknown class folders included (issue 23 §6)
    assert "## Import" in md and "unknown class folders" in md
    assert set(json.loads(js)["import"]) <= {"deepapl", "pbc"}


def test_cross_source_leaves_out_classes_too_small_on_either_side(tmp_path):
    _preds(tmp_path / "p.npz", n_pat=10, per=30, external=True)  # ~100 cells per class
    big = evaluate_real.cross_source(tmp_path / "p.npz", min_cells=50)
    assert sorted(big["shared_classes"]) == ["BLA", "KSC", "LYT"]
    assert big["external"]["n_cells"] == 300
    small = evaluate_real.cross_source(tmp_path / "p.npz", min_cells=1000)
    assert small["shared_classes"] == [] and small["min_cells"] == 1000
    assert np.isnan(small["external"]["macro_f1"])


def test_the_stain_option_with_the_best_mean_of_both_directions_wins():
    def r(f1):
        return {"external": {"macro_f1": f1}}

    xs = {
        "xs_deepapl_none": r(0.50), "xs_pbc_none": r(0.40),  # mean 0.45
        "xs_deepapl_aug": r(0.70), "xs_pbc_aug": r(0.30),  # mean 0.50
        "xs_deepapl_norm": r(0.60), "xs_pbc_norm": r(0.50),  # mean 0.55: best
        "xs_deepapl_aug+norm": r(0.55), "xs_pbc_aug+norm": r(0.55),  # tie: the earlier wins
    }  # fmt: skip
    assert results.best_stain_option(xs) == "norm"
    assert results.best_stain_option({"xs_pbc_aug": r(0.5), "xs_pbc_none": r(0.5)}) == "none"
    with pytest.raises(SystemExit, match="no figure"):
        results.best_stain_option({"xs_pbc_none": r(float("nan"))})


def test_patient_dependence_shows_a_class_that_rests_on_one_patient():
    """PMO held by two patients, one of them all called BLA: leaving that patient out lifts
    the PMO F1 to 1; BLA, spread over every patient, barely moves. Reading PMO as BLA
    (blast equivalents) removes the PMO/BLA confusion."""
    names = list(CODES)
    bla, pmo, lyt = (names.index(c) for c in ("BLA", "PMO", "LYT"))
    y, p, g = [], [], []
    for i in range(6):
        y += [bla] * 20 + [lyt] * 20
        p += [bla] * 20 + [lyt] * 20
        g += [f"P{i}"] * 40
    y += [pmo] * 10 + [pmo] * 10  # P0: PMO read right; P1: PMO all called BLA
    p += [pmo] * 10 + [bla] * 10
    g += ["P0"] * 10 + ["P1"] * 10
    y_, p_, g_ = np.array(y), np.array(p), np.array(g)
    dep = evaluate_real.patient_dependence(y_, p_, g_, names, [bla, pmo])
    assert dep["PMO"]["patients"] == 2 and dep["PMO"]["top2_share"] == 1.0
    assert dep["PMO"]["f1"] == pytest.approx(2 * 10 / (20 + 10))
    assert dep["PMO"]["f1_leave_one_patient_out"][1] == pytest.approx(1.0)  # P1 left out
    assert dep["BLA"]["patients"] == 6 and dep["BLA"]["top2_share"] == pytest.approx(2 / 6)
    y_be, p_be = evaluate_real.merged(y_, p_, bla, [pmo])
    assert (y_be == p_be).all()


def test_the_report_carries_the_patient_dependence_and_blast_equivalents(tmp_path):
    _preds(tmp_path / "p.npz")
    rep = evaluate_real.real_report(tmp_path / "p.npz", min_cells=50, n_boot=20)
    assert set(rep["patient_dependence"]) == {"BLA", "LYT", "KSC"}
    be = rep["blast_equivalents"]
    assert be["classes"] == rep["classes_min_cells"]  # no PMO in this set: nothing merges
    assert be["macro_f1"] == pytest.approx(rep["macro_f1"])
    assert be["recall"] == pytest.approx(rep["blast_recall"])
    md = evaluate_real._dependence_lines(rep)
    assert any(line.startswith("| KSC |") for line in md)
