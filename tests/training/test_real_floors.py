"""Regression floors on the real data (`../shared/data`), quick enough for every CI run.

The reported cell-typer figures (docs/RESULTS.md, `real-cpu`: 26 min) cannot run in CI, so a
quick CPU config of the same job trains here on the same patient split (DeepAPL
patient-grouped + PBC in train/val; 18 held-out DeepAPL patients, 2,403 cells): the tiny CNN
at 32 px, 4 epochs of 150 steps of 64 crops (about 40 s of CPU, most of it decoding the
13,897 images). Its figures, measured on the 2-core CPU (torch 2.14.1, one thread):

    macro-F1 over classes with >= 50 test cells 0.612 (patient bootstrap CI 0.568-0.650),
    accuracy 0.646, blast recall 0.519

The floors sit below them with a stated margin: 0.10 for macro-F1 and accuracy (more than
twice the CI half-width, so seed or library changes pass and a broken reader, label map,
split or training loop does not), 0.17 for blast recall (one class's operating point moves
more). A real-data figure that drops below its floor fails CI; under CI=true a missing
../shared/data fails too (tests/ci_skips.py). The nucleus Dice floor on wbc-seg lives in
test_evaluate_morphometrics.py (floor 0.85, reported 0.955).
"""

from __future__ import annotations

import pytest

from tests.training.conftest import job_args
from training import celltype
from training.evaluate_real import real_report

pytestmark = pytest.mark.slow

QUICK = {"batch_size": 64, "max_steps_per_epoch": 150, "epochs": 4, "class_balance": 0.5}
FLOORS = {"macro_f1": 0.50, "accuracy": 0.55, "blast_recall": 0.35}
MEASURED = {"macro_f1": 0.612, "accuracy": 0.646, "blast_recall": 0.519}


def test_quick_cell_typer_on_real_patients_stays_above_its_floors(shared_data, tmp_path):
    for source in ("deepapl", "pbc"):
        if not (shared_data / source).is_dir():
            pytest.skip(f"{shared_data / source} is absent (see ../shared/data/README.md)")
    flags = ["--data", shared_data, "--output", tmp_path / "run", "--config", "cpu-tiny",
             "--no-register", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    for key, value in QUICK.items():
        flags += ["--set", f"{key}={value}"]
    celltype.main(job_args(celltype, *flags))
    report = real_report(tmp_path / "run" / celltype.PREDICTIONS_FILE, n_boot=100)
    # the same held-out patients as the reported figures: the split is part of the floor
    assert (report["n_patients"], report["n_cells"]) == (18, 2403)
    got = {key: report[key] for key in FLOORS}
    assert all(got[k] >= FLOORS[k] for k in FLOORS), (got, FLOORS, MEASURED)
