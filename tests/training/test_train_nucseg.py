"""The nucseg training job end to end at cpu-tiny size: wbc-seg-shaped data (a tiny
stand-in folder, not the real set) cross-validated by image, synthetic crowded cells,
per-domain figures for the learned and the classical split, registration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from marrowscope.registry import get_client, registered_name
from tests.training.conftest import job_args
from training import nucseg, nucseg_shift
from training.cli import UsageError


@pytest.fixture(scope="module")
def wbc_like(tmp_path_factory):
    """Six 48x48 'white cells' in the wbc-seg layout (255 nucleus, 128 cytoplasm)."""
    root = tmp_path_factory.mktemp("wbc")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, 7):
        yy, xx = np.ogrid[:48, :48]
        r2 = (yy - 24 + rng.integers(-3, 4)) ** 2 + (xx - 24 + rng.integers(-3, 4)) ** 2
        mask = np.where(r2 < 64, 255, np.where(r2 < 300, 128, 0)).astype(np.uint8)
        image = np.select(
            [mask[..., None] == 255, mask[..., None] == 128],
            [np.array([90, 40, 140]), np.array([200, 170, 210])],
            np.array([235, 225, 230]),
        ).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        rows.append(f"{i},{1 + i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_cross_validates_scores_both_splits_and_registers(
    tmp_path, wbc_like, sqlite_tracking
):
    args = job_args(
        nucseg,
        "--data", wbc_like, "--output", tmp_path / "out", "--config", "cpu-tiny",
        "--tracking-uri", sqlite_tracking,
    )  # fmt: skip
    metrics = nucseg.main(args)
    results = json.loads((tmp_path / "out" / "nucseg_results.json").read_text())
    assert set(results["domains"]) == {"wbcseg_cv", "synth_crowded"}
    cv = results["domains"]["wbcseg_cv"]
    assert set(cv) == {"learned_learned", "learned_classical", "learned_combined", "classical"}
    assert cv["classical"]["n"] == 6 and "2-fold CV by image" in cv["classical"]["dataset"]
    assert results["domains"]["synth_crowded"]["classical"]["synthetic"] is True
    assert set(results["seconds"]) == {"fold0", "fold1", "final", "total"}
    for key in ("cell_dice", "nucleus_dice", "nc_abs_err", "classical_synth_cell_dice"):
        assert np.isfinite(metrics[key])
    assert metrics["cell_dice"] == min(metrics["wbcseg_cv_cell_dice"], metrics["synth_cell_dice"])
    assert metrics["nc_abs_err"] == max(
        metrics["wbcseg_cv_nc_abs_err"], metrics["synth_nc_abs_err"]
    )
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["kind"] == "nucseg" and config["nucleus_source"] == results["nucleus_source"]
    versions = get_client(sqlite_tracking).search_model_versions(
        f"name='{registered_name('nucseg')}'"
    )
    assert versions and "marrowscope.metric.cell_dice" in versions[0].tags


def test_cv_only_scores_every_split_under_every_shift_and_registers_nothing(
    tmp_path, wbc_like, sqlite_tracking
):
    """The measurement mode (issue 23 §4): one fold, every split under every shift of
    `training.shifts`, the combined rule's threshold measured on the fold's training cells."""
    from training.shifts import SHIFT_NAMES

    args = job_args(
        nucseg,
        "--data", wbc_like, "--output", tmp_path / "out", "--config", "cpu-tiny",
        "--tracking-uri", sqlite_tracking, "--no-register", "--cv-only", "--folds", "1",
    )  # fmt: skip
    metrics = nucseg.main(args)
    results = json.loads((tmp_path / "out" / "nucseg_results.json").read_text())
    assert set(results["domains"]) == {"wbcseg_cv"} and "model" not in {
        p.name for p in (tmp_path / "out").iterdir()
    }
    kept = json.loads((tmp_path / "out" / "fold0" / "config.json").read_text())
    assert kept["nucleus_confidence_min"] == results["calibration"]["fold0"]["threshold"]
    assert results["domains"]["wbcseg_cv"]["classical"]["n"] == 3  # one fold of two: 3 cells
    shifted = results["shifted"]["wbcseg_cv"]
    assert set(shifted) == {"classical", "learned_learned", "learned_classical", "learned_combined"}
    assert set(shifted["classical"]["shifts"]) == set(SHIFT_NAMES)
    over = shifted["classical"]["over_shifts"]["nucleus_dice"]
    assert over["worst"] <= over["mean"] and over["worst_shift"] in SHIFT_NAMES
    assert set(results["calibration"]) == {"fold0"}
    assert results["calibration"]["fold0"]["threshold"] in nucseg_shift.CONFIDENCE_GRID
    source = results["nucleus_source"]
    assert (
        metrics["wbcseg_cv_shift_mean_nucleus_dice"]
        == (shifted[f"learned_{source}"]["over_shifts"]["nucleus_dice"]["mean"])
    )
    assert "classical_wbcseg_cv_shift_worst_cell_dice" in metrics


def test_cv_only_without_no_register_is_refused(tmp_path, wbc_like):
    args = job_args(nucseg, "--data", wbc_like, "--output", tmp_path, "--cv-only")
    with pytest.raises(UsageError, match="--cv-only needs"):
        nucseg.main(args)


def test_without_data_trains_on_synthetic_only(tmp_path, sqlite_tracking):
    args = job_args(
        nucseg, "--output", tmp_path / "out", "--config", "cpu-tiny", "--no-register",
        "--tracking-uri", sqlite_tracking,
    )  # fmt: skip
    metrics = nucseg.main(args)
    assert "wbcseg_cv_cell_dice" not in metrics and "synth_cell_dice" in metrics


def test_bad_data_folder_is_refused_before_work(tmp_path):
    args = job_args(nucseg, "--data", tmp_path, "--output", tmp_path / "out")
    with pytest.raises(UsageError, match="masks"):
        nucseg.main(args)


def test_evaluate_morphometrics_scores_a_learned_splitter(tmp_path, capsys):
    """`evaluate_morphometrics --splitter DIR` scores the learned split on the same cells and
    says which split it scored (here an untrained net, so only the contract is checked)."""
    from tests.fixtures_mlflow import make_tiny_model_dir
    from tests.training.test_evaluate_morphometrics import _write_coco
    from training.evaluate_morphometrics import get_args_parser, main

    (tmp_path / "coco").mkdir()
    data = _write_coco(tmp_path / "coco")
    model = make_tiny_model_dir("nucseg", tmp_path / "m")
    classical = main(get_args_parser().parse_args(["--synthetic", str(data)]))
    learned = main(
        get_args_parser().parse_args(["--synthetic", str(data), "--splitter", str(model)])
    )
    assert classical["split"] == "classical" and learned["split"].startswith("learned local-")
    assert learned["n"] == classical["n"] == 2
    assert 0.0 <= learned["cell_dice_median"] <= 1.0


def test_the_served_nucleus_wins_under_shifts_without_losing_the_unshifted_figure():
    def domain(**unshifted: float) -> dict:
        return {f"learned_{s}": {"nucleus_dice_median": v} for s, v in unshifted.items()}

    def over(mean: float, worst: float) -> dict:
        return {"over_shifts": {"nucleus_dice": {"mean": mean, "worst": worst}}}

    domains = {"wbcseg_cv": domain(learned=0.960, classical=0.957, combined=0.950)}
    shifted = {
        "wbcseg_cv": {
            "learned_learned": over(0.957, 0.949),
            "learned_classical": over(0.956, 0.953),  # within 0.005 unshifted, best sum
            "learned_combined": over(0.990, 0.990),  # best under shifts, but 0.010 behind
        }
    }
    assert nucseg._pick_nucleus_source(domains, shifted) == "classical"
    assert nucseg._pick_nucleus_source(domains) == "learned"  # no shifted figures: as before
