"""`python -m training.domain` on tiny look-alikes of the real sets (the reference saved at
the end of typer training is checked in test_train_celltype's resume test, which trains)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from marrowscope.domain import REFERENCE_FILE, DomainReference
from training import celltype, domain


def _cell(path, colour, seed, size=36):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 225.0)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgb[disk] = colour
    rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=92)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """DeepAPL (12 patients), PBC and wbc-seg look-alikes; no BCCD (its absence is logged)."""
    root = tmp_path_factory.mktemp("shared")
    d = root / "deepapl"
    patients, cells = ["patient_id,diagnosis,age,sex"], ["patient_id,cell_class,file"]
    for p in range(12):
        pid = f"Patient_{p:02d}"
        patients.append(f"{pid},{'APL' if p % 3 == 0 else 'AML'},40,Male")
        for cls, colour in (
            ("Blast, no lineage spec", (90, 60, 160)),
            ("Lymphocyte", (40, 40, 120)),
        ):
            for j in range(4):
                rel = f"images/{pid}/{cls}/{j}.jpg"
                _cell(d / rel, colour, p * 100 + j)
                cells.append(f'{pid},"{cls}","{rel}"')
    (d / "patients.csv").write_text("\n".join(patients) + "\n")
    (d / "cells.csv").write_text("\n".join(cells) + "\n")
    rows = ["cell_class,file"]
    for j in range(40):
        _cell(root / "pbc" / f"images/lymphocyte/{j}.jpg", (60, 50, 110), 5000 + j)
        rows.append(f"lymphocyte,images/lymphocyte/{j}.jpg")
    (root / "pbc" / "cells.csv").write_text("\n".join(rows) + "\n")
    for j in range(24):  # another scanner: green-grey background, pale cells
        rgb = np.clip(
            np.random.default_rng(j).normal((150, 190, 150), 8, (30, 30, 3)), 0, 255
        ).astype(np.uint8)
        (root / "wbc-seg" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "wbc-seg" / "images" / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_typer(tmp_path_factory):
    import torch

    from marrowscope.models import build_model, make_config, save_model

    torch.manual_seed(0)
    config = make_config(
        "celltype",
        "tiny_cnn",
        outputs=celltype.outputs(),
        crop_size=32,
        hyperparameters={"crop_pad_fraction": 0.1},
        training={"config_name": "cpu-tiny", "data_hash": "0" * 64, "seed": 0},
    )
    return save_model(build_model(config), config, tmp_path_factory.mktemp("typer") / "model")


def test_command_calibrates_installs_and_reports(real_root, tiny_typer, tmp_path):
    args = domain.get_args_parser().parse_args(
        [
            "--typer",
            str(tiny_typer),
            "--workdir",
            str(tmp_path / "work"),
            "--data",
            str(real_root),
            "--report-dir",
            str(tmp_path / "report"),
            "--cells-per-case",
            "4",
            "--bootstrap",
            "20",
            "--set",
            "test_fraction=0.25",
            "--set",
            "val_fraction=0.25",
            "--shifts",
            "bg_warm",
            "bg_warm_x4",
            "--install",
        ]
    )
    report = domain.main(args)
    reference = DomainReference.load(tmp_path / "work")
    assert reference is not None and reference.threshold == report["threshold"]
    assert (tiny_typer / REFERENCE_FILE).read_text() == (
        tmp_path / "work" / REFERENCE_FILE
    ).read_text()
    assert report["held_out_patients"] == 3 and 0 <= report["held_out_abstained"] <= 1
    wbc = report["external"]["wbc-seg"]
    assert wbc["n_out"] == 6 and wbc["auroc"] == 1.0  # another background colour entirely
    assert set(report["leave_one_source_out"]) == {"deepapl_only", "pbc_only"}
    shifts = report["shifts"]
    assert shifts["bg_warm"]["kind"] == "tolerated" and shifts["bg_warm_x4"]["kind"] == "strong"
    assert shifts["bg_warm_x4"]["median_score"] > shifts["bg_warm"]["median_score"]
    saved = json.loads((tmp_path / "report" / "domain.json").read_text())
    assert saved["threshold"] == report["threshold"]
    md = (tmp_path / "report" / "domain.md").read_text()
    assert "bg_warm_x4" in md and "wbc-seg" in md and str(tmp_path) not in md


def test_command_refuses_bad_flags(tiny_typer, tmp_path):
    from training.cli import UsageError

    parser = domain.get_args_parser()
    base = ["--typer", str(tiny_typer), "--workdir", str(tmp_path)]
    with pytest.raises(UsageError, match="unknown shifts"):
        domain.main(parser.parse_args([*base, "--shifts", "tilt"]))
    with pytest.raises(UsageError, match="not a model directory"):
        domain.main(parser.parse_args(["--typer", str(tmp_path), "--workdir", str(tmp_path)]))
