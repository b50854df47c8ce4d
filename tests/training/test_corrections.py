"""Corrections exports as training data and as evidence: the split by accession, the
comparison of typers on corrected cells neither trained on (the `evaluate corrections`
command and the promotion gate, against a real file-backed MLflow registry), and bad input.

Typers of known answers make the outcomes certain: a tiny celltype model with a large logit
bias calls every cell that type whatever the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_mlflow import make_tiny_model_dir
from training import celltype
from training.cli import JobConfig, UsageError, load_job_config
from training.data import corrections

# analysis id -> (accession key, number of cells); a1 and a2 share an accession
CASES = {
    "a1": ("acc-A", 3),
    "a2": ("acc-A", 2),
    "a3": ("acc-B", 3),
    "a4": ("acc-C", 2),
    "a5": ("acc-D", 2),
    "a6": ("acc-E", 2),
}


def make_export(root: Path, cases: dict = CASES, label: str = "LYT", model: str = "BLA") -> Path:
    """A corrections export as `training.data.corrections export` writes it (the parts the
    readers use): crops and manifest lines, every cell relabelled `model` -> `label`."""
    rng = np.random.default_rng(0)
    lines = []
    for analysis, (accession, n) in cases.items():
        for j in range(n):
            crop = f"crops/{label}/{analysis}_0-{j}.png"
            (root / crop).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / crop)
            lines.append(
                {
                    "analysis_id": analysis,
                    "accession": accession,
                    "tenant": "default",
                    "celltype_version": "5",
                    "cell": f"0.{j}",
                    "crop": crop,
                    "original_label": model if j else label,  # each case's first cell kept
                    "corrected_label": label,
                    "corrected": bool(j),
                    "added": False,
                    "excluded": False,
                }
            )
    (root / corrections.MANIFEST).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _config() -> JobConfig:
    return JobConfig.of("celltype", load_job_config("celltype", "cpu-tiny"))


def _base(n: int) -> celltype.CropSet:
    return celltype.CropSet(
        np.zeros((n, 32, 32, 3), np.uint8),
        np.zeros(n, np.int64),
        np.zeros((n, 4), np.float32),
    )


def test_corrections_join_the_splits_with_each_accession_on_one_side(tmp_path: Path) -> None:
    export = make_export(tmp_path / "export")
    base = {"train": _base(4), "val": _base(2), "test": _base(2)}
    splits, record = celltype.with_corrections(base, export, _config())
    side: dict[str, set[str]] = {}
    for name, cs in splits.items():
        new = cs.sources == celltype.CORRECTIONS_SOURCE
        assert (~new).sum() == len(base[name].cells), "the usual data changed"
        assert np.isnan(cs.attributes[new]).all() and not np.isnan(cs.attributes[~new]).any()
        for g in cs.groups[new]:
            side.setdefault(g, set()).add(name)
    assert all(len(s) == 1 for s in side.values()), side
    assert len(side) == 5 and any(s == {"test"} for s in side.values())
    trained, held = set(record["trained_analyses"]), set(record["held_out_analyses"])
    assert trained.isdisjoint(held) and trained | held == set(CASES)
    assert {"a1", "a2"} <= trained or {"a1", "a2"} <= held, "one accession split in two"
    assert sum(record["cells"].values()) == sum(n for _, n in CASES.values())


def test_a_label_the_taxonomy_does_not_know_is_refused(tmp_path: Path) -> None:
    export = make_export(tmp_path / "export", label="XYZ")
    with pytest.raises(UsageError, match="not taxonomy codes"):
        celltype.with_corrections({"train": _base(1)}, export, _config())
    with pytest.raises(UsageError, match="not a corrections export"):
        celltype.with_corrections({"train": _base(1)}, tmp_path, _config())


def test_recorded_agreement_per_version_class_and_tenant(tmp_path: Path) -> None:
    found = corrections.recorded_agreement(make_export(tmp_path / "export"))
    n = sum(k for _, k in CASES.values())
    overall = found["5"]["overall"]
    assert overall == {"cells": n, "kept": len(CASES), "agreement": len(CASES) / n}
    assert found["5"]["by_class"]["BLA"]["agreement"] == 0.0
    assert found["5"]["by_class"]["LYT"]["agreement"] == 1.0
    assert found["5"]["by_tenant"]["default"] == overall


def _typer(root: Path, code: str, trained: list[str] | None = None) -> Path:
    model = make_tiny_model_dir("celltype", root, logit_bias={code: 40.0})
    if trained is not None:
        record = {"trained_analyses": trained, "held_out_analyses": []}
        (model / celltype.CORRECTIONS_FILE).write_text(json.dumps(record))
    return model


def test_evaluate_corrections_compares_on_cells_the_candidate_has_not_learned(
    tmp_path: Path, capsys
) -> None:
    from training.evaluate_corrections import main

    export = make_export(tmp_path / "export")
    good = _typer(tmp_path / "good", "LYT", trained=["a1", "a2"])
    bad = _typer(tmp_path / "bad", "BLA")
    assert main(["--export", str(export), "--typer", str(good), "--champion", str(bad)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    held_out_cells = sum(n for a, (_, n) in CASES.items() if a not in ("a1", "a2"))
    assert out["held_out_analyses"] == 4
    assert out["candidate"]["cells"] == held_out_cells and out["candidate"]["accuracy"] == 1.0
    assert out["champion"]["cells"] == held_out_cells and out["champion"]["accuracy"] == 0.0
    assert out["agreement"]["5"]["overall"]["kept"] == len(CASES)
    assert main(["--export", str(tmp_path), "--typer", str(good)]) == 2


def test_the_promotion_gate_on_corrected_cells(tmp_path: Path, sqlite_tracking: str) -> None:
    from marrowscope.registry import get_client, register_model_dir, registered_name
    from training.promote import promote

    export = make_export(tmp_path / "export")

    def register(model: Path) -> str:
        return register_model_dir(
            "celltype", model, metrics={"macro_f1": 0.9}, params={}, data_hash="t", lineage={},
            tracking_uri=sqlite_tracking,
        )  # fmt: skip

    bad = register(_typer(tmp_path / "bad", "BLA"))
    good = register(_typer(tmp_path / "good", "LYT", trained=["a1"]))
    saw_all = register(_typer(tmp_path / "all", "LYT", trained=list(CASES)))
    client = get_client(sqlite_tracking)
    name = registered_name("celltype")

    def gate(candidate: str, champion: str, **kw):
        client.set_registered_model_alias(name, "champion", champion)
        ok, decisions = promote(
            {"celltype": candidate},
            tracking_uri=sqlite_tracking,
            floors={"celltype": {}},
            dry_run=True,
            **kw,
        )
        return ok, next((d for d in decisions if d.gate == "corrections"), None)

    assert gate(bad, good)[1] is None, "the gate is off unless asked for"
    ok, d = gate(good, bad, corrections=export)
    assert ok and d.passed and "of 5 cases: 1 >= champion" in d.detail, d
    ok, d = gate(bad, good, corrections=export)
    assert not ok and not d.passed and "0 < champion" in d.detail, d
    ok, d = gate(saw_all, bad, corrections=export)
    assert not ok and "no corrected cells" in d.detail, d


def test_promote_refuses_a_folder_that_is_not_an_export(tmp_path: Path, capsys) -> None:
    from training.promote import get_args_parser, main

    args = get_args_parser().parse_args(
        ["--model", "celltype", "--version", "1", "--corrections", str(tmp_path)]
    )
    assert main(args) == 2
    assert "not a corrections export" in capsys.readouterr().err


def test_export_refuses_bad_dates_and_a_non_empty_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    db = f"sqlite:///{tmp_path / 'none.db'}"
    base = ["export", "--db", db, "--images", str(tmp_path)]
    assert corrections.main([*base, "--since", "last week", "--out", str(tmp_path / "x")]) == 2
    assert "not a date" in capsys.readouterr().err
    assert corrections.main([*base, "--since", "2026-01-01", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
