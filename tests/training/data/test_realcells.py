"""DeepAPL / PBC readers: mapping, truncated and missing files, the patient-grouped split.

Tiny sets written in tmp dirs; one test reads a few real files from ../shared/data and
skips when that folder is absent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.coco import DatasetFormatError
from training.data.deepapl import read_deepapl
from training.data.pbc import read_pbc
from training.data.singlecell import DataUnavailable, split_files, split_patients

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _jpeg(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (40, 42, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path.read_bytes()


def _deepapl(root: Path, n_patients: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    patients = ["patient_id,diagnosis,age,sex"]
    cells = ["patient_id,cell_class,file"]
    for p in range(n_patients):
        pid = f"Patient_{p:02d}"
        patients.append(f"{pid},{'APL' if p % 2 else 'AML'},{30 + p},Female")
        for j, cls in enumerate(("Blast, no lineage spec", "Smudge cells", "", "Promonocyte")):
            rel = f"images/{pid}/{cls or 'unlabelled'}/c{j}.jpg"
            _jpeg(root / rel, p * 10 + j)
            cells.append(f'{pid},"{cls}","{rel}"')
    patients.append("Patient_99,AML,50,Male")  # listed, no images (as in the real set)
    (root / "patients.csv").write_text("\n".join(patients) + "\n")
    (root / "cells.csv").write_text("\n".join(cells) + "\n")
    return root


def test_deepapl_maps_classes_and_keeps_unlabelled_cells(tmp_path):
    data = read_deepapl(_deepapl(tmp_path / "deepapl"))
    assert len(data.records) == 32 and data.report.unlabelled == 8
    codes = {r.source_class: r.code for r in data.records}
    assert codes == {"Blast, no lineage spec": "BLA", "Smudge cells": "KSC", "": None,
                     "Promonocyte": "BLA"}  # fmt: skip
    assert len(data.labelled()) == 24
    p = data.patients["Patient_01"]
    assert (p.diagnosis, p.age, p.n_cells) == ("APL", 31, 4)
    assert data.patients["Patient_99"].n_cells == 0
    r = data.records[0]
    assert r.patient_id == "Patient_00" and r.diagnosis == "AML" and r.path.is_file()


def test_truncated_and_missing_files_are_logged_counted_and_skipped(tmp_path, caplog):
    root = _deepapl(tmp_path / "deepapl", n_patients=2)
    victim = root / "images/Patient_00/Smudge cells/c1.jpg"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # truncated
    (root / "images/Patient_01/Promonocyte/c3.jpg").unlink()
    with caplog.at_level(logging.INFO):
        data = read_deepapl(root)
    assert len(data.records) == 6
    assert data.report.listed == 8 and data.report.kept == 6
    assert len(data.report.unreadable) == 1 and "c1.jpg" in data.report.unreadable[0]
    assert len(data.report.missing) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("c1.jpg" in m and "unreadable" in m for m in lines) == 1
    assert sum("c3.jpg" in m and "missing" in m for m in lines) == 1
    assert any("6 of 8 listed cells kept" in m and "1 unreadable" in m for m in lines)
    # without verify the truncated file is only found when it is decoded
    assert len(read_deepapl(root, verify=False).records) == 7


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataUnavailable, match="not on this machine"):
        read_deepapl(tmp_path / "nothing")
    root = _deepapl(tmp_path / "d", n_patients=1)
    text = (root / "cells.csv").read_text()
    (root / "cells.csv").write_text(text + 'Patient_00,"Hairy cell",images/x.jpg\n')
    with pytest.raises(KeyError, match="'Hairy cell' has no taxonomy mapping"):
        read_deepapl(root, strict=True)
    (root / "cells.csv").write_text(text + 'Patient_42,"Monocyte",images/x.jpg\n')
    with pytest.raises(DatasetFormatError, match="Patient_42"):
        read_deepapl(root)


def _later_cohort(root: Path, n_patients: int = 2) -> Path:
    """A sign-out with an "Artifact" folder and one the taxonomy lacks (Patient_00/01)."""
    _deepapl(root, n_patients=n_patients)
    rows = []
    for j, (pid, cls) in enumerate(
        [("Patient_00", "Artifact"), ("Patient_01", "Hairy cell"), ("Patient_01", "Hairy cell")]
    ):
        rel = f"images/{pid}/{cls}/n{j}.jpg"
        _jpeg(root / rel, 100 + j)
        rows.append(f'{pid},"{cls}","{rel}"')
    with (root / "cells.csv").open("a") as f:
        f.write("\n".join(rows) + "\n")
    return root


def test_unknown_class_folder_is_reported_and_kept_unlabelled(tmp_path, caplog):
    root = _later_cohort(tmp_path / "deepapl")
    with caplog.at_level(logging.INFO):
        data = read_deepapl(root)
    assert len(data.records) == 11 and data.report.kept == 11
    assert data.report.unknown_classes == {"Hairy cell": 2}
    codes = {r.source_class: r.code for r in data.records}
    assert codes["Artifact"] == "ART" and codes["Hairy cell"] is None
    assert "Hairy cell" not in {r.source_class for r in data.labelled()}
    assert data.patients["Patient_01"].n_cells == 6  # its unknown-folder cells still count
    assert any("'Hairy cell' (2)" in r.getMessage() for r in caplog.records)
    assert data.report.as_dict()["unknown_classes"] == {"Hairy cell": 2}


def test_strict_stops_on_an_unknown_class_folder_naming_it(tmp_path):
    root = _later_cohort(tmp_path / "deepapl")
    with pytest.raises(KeyError, match="'Hairy cell' has no taxonomy mapping"):
        read_deepapl(root, strict=True)
    pbc = tmp_path / "pbc"
    _jpeg(pbc / "images/x/0.jpg", 0)
    (pbc / "cells.csv").write_text("cell_class,file\nneutrophil_giant,images/x/0.jpg\n")
    assert read_pbc(pbc).report.unknown_classes == {"neutrophil_giant": 1}
    with pytest.raises(KeyError, match="'neutrophil_giant'"):
        read_pbc(pbc, strict=True)


def test_unknown_class_folders_go_to_the_active_mlflow_run(tmp_path, sqlite_tracking):
    import mlflow

    mlflow.set_tracking_uri(sqlite_tracking)
    # its own experiment: an earlier test's active experiment (a process-wide mlflow setting)
    # may not exist in this store ("No Experiment with id=2 exists")
    mlflow.set_experiment(f"import-{tmp_path.name}")
    with mlflow.start_run() as run:
        read_deepapl(_later_cohort(tmp_path / "deepapl"), verify=False)
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).data.metrics["import_deepapl_unknown_cells"] == 2
    local = client.download_artifacts(run.info.run_id, "import/deepapl.json", str(tmp_path))
    assert '"Hairy cell": 2' in Path(local).read_text()


def test_patient_split_never_puts_a_patient_on_two_sides(tmp_path):
    data = read_deepapl(_deepapl(tmp_path / "deepapl", n_patients=20), verify=False)
    sides = split_patients(data.records, test_fraction=0.2, val_fraction=0.2, seed=0)
    assert set(sides) == {f"Patient_{p:02d}" for p in range(20)}
    assert set(sides.values()) == {"train", "val", "test"}
    by_side: dict[str, set[str]] = {}
    for r in data.records:
        by_side.setdefault(sides[r.patient_id], set()).add(r.patient_id)
    assert not (by_side["train"] & by_side["test"]) and not (by_side["val"] & by_side["test"])
    assert not (by_side["train"] & by_side["val"])
    # stratified by diagnosis: both APL and AML patients in the test split
    dx = {data.patients[p].diagnosis for p in by_side["test"]}
    assert dx == {"AML", "APL"}
    assert split_patients(data.records, test_fraction=0.2, val_fraction=0.2, seed=0) == sides


def test_pbc_reader_and_file_split(tmp_path):
    root = tmp_path / "pbc"
    rows = ["cell_class,file"]
    for cls in ("platelet", "band_neutrophil"):
        for j in range(5):
            _jpeg(root / f"images/{cls}/{j}.jpg", j)
            rows.append(f"{cls},images/{cls}/{j}.jpg")
    (root / "cells.csv").write_text("\n".join(rows) + "\n")
    data = read_pbc(root)
    assert {r.code for r in data.records} == {"PLT", "NGB"}
    assert all(r.patient_id is None and r.diagnosis == "healthy" for r in data.records)
    labels = split_files(10, test_fraction=0.2, val_fraction=0.2, seed=1)
    assert sorted(labels.tolist()).count("test") == 2 and list(labels).count("val") == 2


@pytest.mark.real_data
def test_a_few_real_files_read():
    if not (SHARED / "deepapl" / "cells.csv").is_file() or not (SHARED / "pbc").is_dir():
        pytest.skip("../shared/data (deepapl, pbc) is absent: real data not on this machine")
    data = read_deepapl(SHARED / "deepapl", verify=False)
    assert len(data.patients) >= 81
    assert {p.diagnosis for p in data.patients.values()} == {"AML", "APL"}
    assert len(data.labelled()) > 10_000
    from training.data.singlecell import image_problem

    sample = data.labelled()[:: len(data.labelled()) // 5][:5]
    assert all(image_problem(r.path) is None for r in sample)
    pbc = read_pbc(SHARED / "pbc", verify=False)
    assert len(pbc.records) == 2750 and {r.code for r in pbc.records} >= {"PLT", "NGS", "EBO"}


def test_jobs_that_import_real_cells_take_strict(tmp_path):
    """`--strict` reaches the readers from the jobs: training.celltype (through
    `common_data.real_cell_splits`), training.apl (`read_cohort`) and training.results real;
    the real-typer report's import section names the unknown folder."""
    from training import apl, celltype, results
    from training.cli import UsageError, load_job_config
    from training.common_data import real_cell_splits, real_import_reports
    from training.data.singlecell import import_markdown

    root = tmp_path / "shared"
    _later_cohort(root / "deepapl", n_patients=8)
    config = {
        **load_job_config("celltype", "cpu-tiny"),
        "real_train_sources": ["deepapl"],
        "test_fraction": 0.5,
        "val_fraction": 0.0,
    }
    sides = real_cell_splits(root, config)
    labelled = {r.source_class for side in sides.values() for r in side}
    assert "Artifact" in labelled and "Hairy cell" not in labelled
    with pytest.raises(KeyError, match="'Hairy cell'"):
        real_cell_splits(root, config, strict=True)
    assert len(apl.read_cohort(root / "deepapl", verify=False).patients) == 8
    with pytest.raises(UsageError, match="'Hairy cell'"):
        apl.read_cohort(root / "deepapl", verify=False, strict=True)
    for module, flags in (
        (celltype, ["--data", str(root)]),
        (apl, ["--workdir", str(tmp_path)]),
        (results, ["real", "--workdir", str(tmp_path)]),
    ):
        assert module.get_args_parser().parse_args([*flags, "--strict"]).strict is True
        assert module.get_args_parser().parse_args(flags).strict is False
    section = import_markdown(real_import_reports(root))
    assert "| deepapl | 35 | 35 | 10 | 'Hairy cell': 2 |" in section
