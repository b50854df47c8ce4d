"""Cell typer on the real single-cell layout (tiny DeepAPL/PBC look-alikes in a tmp dir):
grouped split end to end, predictions for the report, stain jitter, masked attribute loss,
and the real-cells report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import job_args
from training import celltype
from training.cli import JobConfig, load_job_config

DEEPAPL_CLASSES = ("Blast, no lineage spec", "Lymphocyte", "Smudge cells", "")
PBC_CLASSES = ("lymphocyte", "platelet")


def _cell(path, colour, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array(colour) + rng.normal(0, 12, (36, 36, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=92)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    colours = {"Blast, no lineage spec": (90, 60, 160), "Lymphocyte": (40, 40, 120),
               "Smudge cells": (200, 170, 200), "": (128, 128, 128)}  # fmt: skip
    d = root / "deepapl"
    patients, cells = ["patient_id,diagnosis,age,sex"], ["patient_id,cell_class,file"]
    for p in range(12):
        pid = f"Patient_{p:02d}"
        patients.append(f"{pid},{'APL' if p % 3 == 0 else 'AML'},40,Male")
        for cls in DEEPAPL_CLASSES:
            for j in range(3):
                rel = f"images/{pid}/{cls or 'none'}/{j}.jpg"
                _cell(d / rel, colours[cls], p * 100 + j)
                cells.append(f'{pid},"{cls}","{rel}"')
    (d / "patients.csv").write_text("\n".join(patients) + "\n")
    (d / "cells.csv").write_text("\n".join(cells) + "\n")
    rows = ["cell_class,file"]
    for cls, colour in zip(PBC_CLASSES, ((60, 50, 110), (170, 120, 170)), strict=True):
        for j in range(10):
            _cell(root / "pbc" / f"images/{cls}/{j}.jpg", colour, j)
            rows.append(f"{cls},images/{cls}/{j}.jpg")
    (root / "pbc" / "cells.csv").write_text("\n".join(rows) + "\n")
    return root


def _config(**over) -> JobConfig:
    base = load_job_config("celltype", "cpu-tiny")
    return JobConfig.of("celltype", {**base, "test_fraction": 0.25, "val_fraction": 0.25, **over})


def test_real_splits_keep_patients_apart_and_pbc_in_train_val(real_root):
    splits = celltype.load_splits(real_root, _config())
    pats = {k: set(v.groups.tolist()) - {""} for k, v in splits.items()}
    assert pats["test"] and not (pats["test"] & (pats["train"] | pats["val"]))
    assert not (pats["train"] & pats["val"])
    assert "pbc" not in set(splits["test"].sources.tolist())  # pbc: train/val only
    assert "pbc" in set(splits["train"].sources.tolist())
    assert "external" not in splits  # both sources trained on
    from marrowscope.taxonomy import CODES

    assert {CODES[i] for i in splits["train"].cells} == {"BLA", "LYT", "KSC", "PLT"}
    assert splits["train"].crops.shape[1:] == (32, 32, 3)


def test_one_source_makes_the_other_external(real_root):
    splits = celltype.load_splits(real_root, _config(real_train_sources=["deepapl"]))
    assert set(splits["external"].sources.tolist()) == {"pbc"}
    assert len(splits["external"].cells) == 20
    splits = celltype.load_splits(real_root, _config(real_train_sources=["pbc"]))
    assert set(splits["test"].sources.tolist()) == {"pbc"}  # pbc split by file here
    assert set(splits["external"].sources.tolist()) == {"deepapl"}


def test_training_writes_predictions_and_the_report_reads_them(real_root, tmp_path):
    from training.evaluate_real import cross_source, real_report

    flags = ["--data", real_root, "--config", "cpu-tiny", "--no-register",
             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--set", "stain_aug=both",
             "--set", "stain_strength=0.1", "--set", "class_balance=0.5"]  # fmt: skip
    out = tmp_path / "main"
    metrics = celltype.main(job_args(celltype, *flags, "--output", out))
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    from marrowscope.models import load_model

    assert load_model(out / "model").config["outputs"][: len(celltype.outputs())] == (
        celltype.outputs()
    )
    rep = real_report(out / celltype.PREDICTIONS_FILE, min_cells=1, n_boot=50)
    assert rep["n_patients"] >= 2 and rep["n_cells"] == sum(
        m["support"] for m in rep["per_class"].values()
    )
    assert rep["macro_f1_ci"][0] <= rep["macro_f1"] + 1e-9
    assert 0.0 <= rep["calibration"]["ece"] <= 1.0
    assert sum(map(sum, rep["confusion"]["matrix"])) == rep["n_cells"]
    xs_out = tmp_path / "xs"
    celltype.main(
        job_args(celltype, *flags, "--output", xs_out, "--set", 'real_train_sources=["deepapl"]')
    )
    xs = cross_source(xs_out / celltype.PREDICTIONS_FILE)
    assert xs["shared_classes"] == ["LYT"]  # PLT never trained on, BLA/KSC not in PBC
    assert xs["external"]["n_cells"] == 10 and xs["external"]["source"] == ["pbc"]


def test_stain_jitter_changes_colour_and_stays_in_range():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16) * 0.8 + 0.1
    for mode in ("hed", "hsv", "both"):
        y = celltype.stain_jitter(x, mode, 0.1)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        assert (y - x).abs().mean() > 0.005
    assert celltype.stain_jitter(x, "none", 0.1) is x
    # zero strength hed is (numerically) the identity: the projection round-trips
    torch.testing.assert_close(celltype.stain_jitter(x, "hed", 1e-9), x, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="stain_aug"):
        celltype.stain_jitter(x, "macenko", 0.1)


def test_geometric_jitter_keeps_shape_and_range_and_moves_pixels():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 24, 24)
    assert celltype.geometric_jitter(x, 0.0) is x
    y = celltype.geometric_jitter(x, 0.1)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().mean() > 0.05  # rotated / zoomed: not the same pixels
    # a uniform image stays uniform (reflection padding brings in no black border)
    flat = torch.full((2, 3, 24, 24), 0.7)
    torch.testing.assert_close(celltype.geometric_jitter(flat, 0.2), flat)


def test_attribute_loss_is_masked_on_rows_without_labels():
    from marrowscope.models import build_model, make_config

    torch.manual_seed(0)
    model = build_model(
        make_config(
            "celltype", "tiny_cnn", outputs=celltype.outputs(), crop_size=16, cell_head="softmax"
        )  # fmt: skip
    )
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    attrs = torch.zeros(4, model.n_attributes)
    cell_only = celltype.batch_loss(model, x, y, None, "softmax")
    all_nan = celltype.batch_loss(model, x, y, torch.full_like(attrs, float("nan")), "softmax")
    torch.testing.assert_close(all_nan, cell_only)  # no labels: no attribute term, no NaN
    attrs[:2] = float("nan")
    mixed = celltype.batch_loss(model, x, y, attrs, "softmax")
    assert torch.isfinite(mixed) and mixed > cell_only
    mixed.backward()
    assert torch.isfinite(model.head.weight.grad).all()


def test_synthetic_crops_bring_attribute_labels_real_ones_stay_unlabelled(real_root, tiny_cohort):
    cfg = _config(real_train_sources=["deepapl"])
    real = celltype.load_splits(real_root, cfg)["train"]
    mixed = celltype.with_synthetic(real, tiny_cohort, cfg)
    n = len(real.cells)
    assert len(mixed.cells) > n and mixed.crops.shape[1:] == real.crops.shape[1:]
    assert np.isnan(mixed.attributes[:n]).all()
    assert np.isfinite(mixed.attributes[n:]).all() and mixed.attributes[n:].sum() > 0
    assert set(mixed.sources[n:].tolist()) == {"synthetic"}


def test_blast_operating_point_is_the_smallest_bias_reaching_the_target():
    from marrowscope.taxonomy import CODES

    bla, lyt = CODES.index("BLA"), CODES.index("LYT")
    cells = np.array([bla] * 4 + [lyt] * 4)
    probs = np.full((8, len(celltype.outputs())), 1e-3, np.float32)
    probs[:, lyt] = 0.6
    probs[:4, bla] = [0.7, 0.5, 0.3, 0.1]  # blasts the typer ranks 1st, then below LYT
    data = celltype.CropSet(np.zeros((8, 1, 1, 3), np.uint8), cells, None, None, None)
    assert celltype.blast_operating_point(probs, data, 0.25) == 0.0
    # the 2nd blast needs log(0.6 / 0.5) = 0.18 -> 0.2 on the 0.05 grid
    assert celltype.blast_operating_point(probs, data, 0.5) == pytest.approx(0.2)
    assert celltype.blast_operating_point(probs, data, 1.0) == pytest.approx(1.8)
    no_blasts = celltype.CropSet(data.crops[4:], cells[4:], None, None, None)
    assert celltype.blast_operating_point(probs[4:], no_blasts, 0.9) == 0.0
