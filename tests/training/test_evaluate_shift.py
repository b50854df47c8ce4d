"""The generalisation suite (issue 23 §1): its figures on fabricated predictions, per-case
BatchNorm adaptation, and one tiny `training.results shift` run on DeepAPL / PBC / wbc-seg
look-alikes in a tmp dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate_shift as es

NAMES = ["BLA", "PMO", "NGS", "LYT", "MON"]


def _onehot(called: list[str], conf: float = 0.9) -> np.ndarray:
    probs = np.full((len(called), len(NAMES)), (1 - conf) / (len(NAMES) - 1), np.float32)
    for i, c in enumerate(called):
        probs[i, NAMES.index(c)] = conf
    return probs


def test_normal_called_blast_counts_only_mature_cells():
    codes = np.array(["LYT", "LYT", "MON", "PMO", "BLA", "NGS"])
    called = np.array(["BLA", "LYT", "MON", "BLA", "BLA", "NGS"])
    # 4 normal cells (LYT LYT MON NGS), one called BLA; PMO -> BLA and BLA -> BLA not counted
    assert es.normal_called_blast(codes, called) == pytest.approx(0.25)
    assert np.isnan(es.normal_called_blast(np.array(["BLA"]), np.array(["BLA"])))


def test_fixed_class_list_needs_enough_cells_on_every_split():
    counts = [{"BLA": 300, "PMO": 60, "LYT": 200, "EOS": 80},
              {"BLA": 250, "PMO": 55, "LYT": 190, "EOS": 10},
              {"BLA": 400, "PMO": 50, "LYT": 210}]  # fmt: skip
    assert es.fixed_class_list(counts, 50) == ["BLA", "PMO", "LYT"]  # taxonomy order
    assert es.fixed_class_list(counts, 51) == ["BLA", "LYT"]
    assert es.fixed_class_list([], 50) == []


def test_cell_metrics_on_fabricated_calls():
    codes = np.array(["BLA"] * 4 + ["LYT"] * 4 + ["PMO"] * 2)
    called = ["BLA", "BLA", "BLA", "PMO", "LYT", "LYT", "LYT", "BLA", "BLA", "PMO"]
    m = es.cell_metrics(codes, _onehot(called), NAMES, ["BLA", "LYT", "PMO"])
    assert m["n"] == 10
    assert m["blast_recall"] == pytest.approx(0.75)
    assert m["normal_called_blast"] == pytest.approx(0.25)
    # BLA: tp 3, 4 true, 5 called -> 2*3/9; LYT: 3/(4+3)*2; PMO: 1, 2 true, 2 called -> 0.5
    assert m["f1"]["BLA"] == pytest.approx(6 / 9)
    assert m["f1"]["LYT"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx(np.mean([6 / 9, 6 / 7, 0.5]))
    # every call at confidence 0.9, 7 of 10 right: ECE = |0.9 - 0.7|; none saturated
    assert m["ece"] == pytest.approx(0.2, abs=1e-6)
    assert m["saturated"] == 0.0
    sure = es.cell_metrics(codes, _onehot(called, conf=0.995), NAMES, ["BLA"])
    assert sure["saturated"] == 1.0


def test_summary_names_the_worst_shift_and_the_mean_drop():
    by_shift = {"none": {"macro_f1": 0.8, "normal_called_blast": 0.01},
                "blur": {"macro_f1": 0.7, "normal_called_blast": 0.05},
                "jpeg": {"macro_f1": 0.78, "normal_called_blast": 0.02}}  # fmt: skip
    s = es.summarise(by_shift)
    assert s["worst_shift"] == "blur" and s["max_drop"] == pytest.approx(0.1)
    assert s["mean_drop"] == pytest.approx(0.06)
    assert s["max_normal_called_blast"] == pytest.approx(0.05)


def _tiny_typer():
    from marrowscope.inference import CellTyper
    from marrowscope.models import LoadedModel, build_model, make_config
    from training.celltype import outputs

    config = make_config("celltype", "tiny_cnn", outputs=outputs(), crop_size=16)
    torch.manual_seed(0)
    module = build_model(config)
    for m in module.modules():  # training statistics unlike any test batch
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(4.0)
    return CellTyper(
        LoadedModel(module=module, config=config, digest="0" * 64, directory=Path("."))
    )


def test_case_norm_adapts_to_the_case_and_restores_the_training_statistics():
    typer = _tiny_typer()
    before = {k: v.clone() for k, v in typer.module.state_dict().items()}
    crops = np.random.default_rng(0).integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    plain = typer.predict(crops)
    adapted = typer.predict(crops, case_norm=True)
    assert adapted.shape == plain.shape
    assert not np.allclose(adapted, plain, atol=1e-4)  # the case's statistics were used
    for k, v in typer.module.state_dict().items():  # and the model is exactly as before
        assert torch.equal(v, before[k]), k
    assert np.array_equal(typer.predict(crops), plain)
    # the embeddings path gives the same adapted probabilities
    probs, _ = typer.predict_with_embeddings(crops, case_norm=True)
    np.testing.assert_allclose(probs, adapted, atol=1e-6)
    assert typer.predict(crops[:0], case_norm=True).shape == (0, len(typer.names))


def test_shifted_crops_apply_the_shift_before_the_resize():
    img = np.full((40, 40, 3), 200, np.uint8)
    img[10:30, 10:30] = (80, 40, 140)
    none = es.shifted_crops([img], "none", 20)
    warm = es.shifted_crops([img], "bg_warm", 20)
    assert none.shape == (1, 20, 20, 3) and none.dtype == np.uint8
    assert int(warm[0, 0, 0, 0]) > int(none[0, 0, 0, 0])  # the glass got warmer
    assert es.shifted_crops([], "blur", 20).shape == (0, 20, 20, 3)


# ------------------------------------------------------------------ end to end


def _cell(path, colour, seed, size=36):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array(colour) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture(scope="module")
def fake_shared(tmp_path_factory):
    """DeepAPL (12 patients), PBC and wbc-seg look-alikes with the real sets' layout."""
    root = tmp_path_factory.mktemp("shared")
    colours = {"Blast, no lineage spec": (90, 60, 160), "Lymphocyte": (40, 40, 120),
               "Monocyte": (150, 120, 170)}  # fmt: skip
    patients, cells = ["patient_id,diagnosis,age,sex"], ["patient_id,cell_class,file"]
    for p in range(12):
        pid = f"Patient_{p:02d}"
        patients.append(f"{pid},{'APL' if p % 3 == 0 else 'AML'},40,Male")
        for cls, colour in colours.items():
            for j in range(3):
                rel = f"images/{pid}/{cls}/{j}.jpg"
                _cell(root / "deepapl" / rel, colour, p * 100 + j)
                cells.append(f'{pid},"{cls}","{rel}"')
    (root / "deepapl" / "patients.csv").write_text("\n".join(patients) + "\n")
    (root / "deepapl" / "cells.csv").write_text("\n".join(cells) + "\n")
    rows = ["cell_class,file"]
    for cls, colour in (("lymphocyte", (45, 45, 125)), ("monocyte", (150, 125, 175))):
        for j in range(10):
            _cell(root / "pbc" / f"images/{cls}/{j}.jpg", colour, j)
            rows.append(f"{cls},images/{cls}/{j}.jpg")
    (root / "pbc" / "cells.csv").write_text("\n".join(rows) + "\n")
    labels = ["image ID,class label"]
    for i in range(1, 9):  # 2 = lymphocyte, 3 = monocyte
        colour = colours[("Lymphocyte", "Monocyte")[i % 2]]
        _cell(root / "wbc-seg" / "images" / f"{i:03d}.png", colour, i, 40)
        labels.append(f"{i},{2 + i % 2}")
    (root / "wbc-seg" / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


def test_shift_suite_end_to_end_writes_a_report_without_paths(fake_shared, tmp_path, monkeypatch):
    from tests.training.conftest import job_args
    from training import celltype, results

    monkeypatch.setenv("MARROWSCOPE_SHARED_DATA", str(fake_shared))
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "bench")
    monkeypatch.setattr(es, "FIXED_MIN_CELLS", 1)
    monkeypatch.setattr(es, "EXTERNAL_MIN_CELLS", 1)
    work = tmp_path / "work"
    flags = ["--data", fake_shared, "--config", "cpu-tiny", "--no-register",
             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--set", "epochs=1",
             "--set", "test_fraction=0.25", "--set", "val_fraction=0.25"]  # fmt: skip
    celltype.main(job_args(celltype, *flags, "--output", work / "real-cpu"))
    payload = results.main(
        results.get_args_parser().parse_args(
            [
                "shift",
                "--workdir",
                str(work),
                "--typer",
                str(work / "real-cpu"),
                "--case-norm",
                str(work / "real-cpu"),
            ]
        )
    )
    md = (tmp_path / "bench" / "shift.md").read_text()
    js = (tmp_path / "bench" / "shift.json").read_text()
    for text in (md, js):
        assert str(tmp_path) not in text and str(fake_shared) not in text
    assert "--typer DIR/real-cpu" in md and "**Real data**" in md
    assert payload["fixed_classes"]["classes"] == ["BLA", "MON", "LYT"]
    typers = json.loads(js)["typer"]
    assert set(typers) == {"real-cpu", "real-cpu+case_norm"}
    sets = typers["real-cpu"]["sets"]
    assert set(sets) == {"deepapl_test", "pbc_heldout", "wbc_seg"}
    assert set(sets["deepapl_test"]["shifts"]) == set(es.SHIFT_NAMES)
    assert sets["wbc_seg"]["n"] == 8 and sets["wbc_seg"]["classes"] == ["MON", "LYT"]
    assert "validation" in sets["pbc_heldout"]["note"]
    # the unshifted DeepAPL figure is the training run's own test figure (same crops)
    from training.evaluate_real import load_predictions

    pred = load_predictions(work / "real-cpu" / "predictions.npz", "test")
    assert sets["deepapl_test"]["n"] == len(pred["cells"])
    assert payload["split_bar"]["splits"]["0"]["macro_f1"] == pytest.approx(
        sets["deepapl_test"]["shifts"]["none"]["macro_f1"]
    )
    for shift in es.SHIFT_NAMES:
        assert f"| {shift} (" in md
    assert "## Scale of each set" in md and set(payload["cell_size"]) == set(sets)


def _disc_cells(side: int, diameter: float, n: int = 3) -> list[np.ndarray]:
    """SYNTHETIC: a stained disc of `diameter` px on a smear-coloured background."""
    yy, xx = np.mgrid[:side, :side]
    inside = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (diameter / 2) ** 2
    images = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        img = np.empty((side, side, 3), np.uint8)
        img[:] = (232, 222, 228)
        img[inside] = (150, 90, 170)
        images.append(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8))
    return images


def test_relative_cell_size_reads_the_scale_between_sets():
    """SYNTHETIC discs: the same 12 um cell at two pixel sizes, whole images of 180 and 120
    px. The figure is the diameter over the side, so the two sets differ by the scale shift
    a whole-image resize leaves between them."""
    big = es.CellSet("a", _disc_cells(180, 100), np.array(["NGS"] * 3), np.array(["c"] * 3), [])
    small = es.CellSet("b", _disc_cells(120, 80), np.array(["NGS"] * 3), np.array(["c"] * 3), [])
    a, b = es.relative_cell_size(big), es.relative_cell_size(small)
    assert set(a) == {"NGS"} and a["NGS"]["cells"] == 3  # classes it lacks are left out
    assert a["NGS"]["median_fraction"] == pytest.approx(100 / 180, rel=0.08)
    assert b["NGS"]["median_fraction"] == pytest.approx(80 / 120, rel=0.08)
    assert b["NGS"]["median_fraction"] / a["NGS"]["median_fraction"] == pytest.approx(1.2, rel=0.1)
