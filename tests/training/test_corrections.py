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


# -- the export from a job store: only fields with complete boxes are detection targets --------


def _field_png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    rgb = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _cell(x: float, code: str | None, detector: str = "cell") -> dict:
    return {"box": [x, 20, x + 20, 40], "cell_type": code, "detector_label": detector}


def _job_store(tmp_path: Path):
    """A migrated SQLite job store with one signed-out fields case of four images and its
    blobs: image 0 marked complete (a BLA, a cell relabelled ART, an RBC detection and a
    drawn MON), 1 not marked, 2 marked but with a region excluded, 3 marked but excluded."""
    from services.gateway.blobs import BlobStore
    from services.gateway.db import Analysis, CaseReview, make_engine, make_sessionmaker
    from services.gateway.db import Image as StoredImage
    from services.gateway.db import Result as StoredResult
    from services.gateway.migrations import upgrade_head

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_head(engine)
    blobs = BlobStore(tmp_path / "blobs")
    cells = {
        0: [_cell(10, "BLA"), _cell(40, "LYT"), _cell(70, None, "RBC")],
        1: [_cell(10, "LYT")],
        2: [_cell(10, "MON"), _cell(60, "NGS")],
        3: [_cell(10, "EOS")],
    }
    result = {
        "input": "fields",
        "model_versions": {"celltype": {"model": "celltype", "version": "5"}},
        "images": [{"index": i, "width": 160, "height": 120, "cells": c} for i, c in cells.items()],
    }
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        s.add(
            Analysis(
                id="a1", status="succeeded", accession="ACC-1", specimen_type="bm", stain="MGG",
                metadata_json="{}", content_hash="h", n_images=len(cells), created_at=1.0,
            )
        )  # fmt: skip
        s.flush()
        for i in cells:
            sha, _ = blobs.put(_field_png(i))
            s.add(
                StoredImage(
                    analysis_id="a1", idx=i, sha256=sha, size_bytes=1, width=160, height=120,
                    format="png",
                )
            )  # fmt: skip
        s.add(StoredResult(analysis_id="a1", schema_version="1.9", result_json=json.dumps(result)))
        mark = [{"image": i, "by": "dr.a", "at": 1.0} for i in (0, 2, 3)]
        s.add(
            CaseReview(
                analysis_id="a1", revision=5, state="signed_out", signed_at=2.0,
                labels_json=json.dumps({"0.1": "ART"}),
                added_json=json.dumps(
                    [{"id": "0.a1", "image": 0, "box": [100, 60, 130, 90], "code": "MON",
                      "by": "dr.a", "at": 1.0}]
                ),
                excluded_json=json.dumps(
                    [{"id": "x1", "image": 2, "box": [0, 0, 35, 50], "by": "dr.a", "at": 1.0},
                     {"id": "x2", "image": 3, "box": None, "by": "dr.a", "at": 1.0}]
                ),
                complete_json=json.dumps(mark), amendments=0, updated_at=2.0,
            )
        )  # fmt: skip
    return sessions, blobs


def test_only_fields_with_complete_boxes_give_detection_records(tmp_path: Path) -> None:
    sessions, blobs = _job_store(tmp_path)
    out = tmp_path / "export"
    summary = corrections.export(sessions, blobs, out=out, since=0.0, salt="s")
    coco = json.loads((out / corrections.COCO).read_text())
    assert [im["image"] for im in coco["images"]] == [0], "only the complete, unexcluded field"
    image = coco["images"][0]
    assert image["boxes_complete"] is True and image["case_id"] == "a1"
    assert image["patient_id"] == corrections.accession_key(
        "ACC-1", "default", mode="hashed", salt="s"
    )
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = {a["cell"]: names[a["category_id"]] for a in coco["annotations"]}
    # the BLA, the RBC detection and the drawn MON; the cell relabelled ART is no box
    assert boxes == {"0.0": "BLA", "0.2": "RBC", "0.a1": "MON"}
    drawn = next(a for a in coco["annotations"] if a["cell"] == "0.a1")
    assert drawn["added"] is True and drawn["bbox"] == [100, 60, 30, 30]
    written = json.loads((out / corrections.SUMMARY).read_text())
    assert (written["detection_images"], written["crop_only_images"]) == (1, 3)
    assert written["detection_boxes"] == 3 == summary.detection_boxes
    # every non-excluded cell still gives a crop for the typer, the complete field's or not
    lines = {x["cell"]: x for x in corrections.read_manifest(out)}
    assert lines["1.0"]["crop"] and not lines["1.0"]["boxes_complete"]
    assert lines["2.1"]["crop"] and not lines["2.0"]["crop"]  # 2.0's centre in the region
    assert not lines["3.0"]["crop"] and lines["0.0"]["boxes_complete"]
    # the VIA project keeps every exported field for re-editing
    via = json.loads((out / "via.json").read_text())
    assert len(via["_via_img_metadata"]) == 4
    dataset = corrections.read_detection(out)
    assert len(dataset.images) == 1 and len(dataset.annotations) == 3


def test_read_detection_refuses_what_is_not_a_complete_export(tmp_path: Path) -> None:
    sessions, blobs = _job_store(tmp_path)
    out = tmp_path / "export"
    corrections.export(sessions, blobs, out=out, since=0.0)
    with pytest.raises(ValueError, match="not a corrections export"):
        corrections.read_detection(tmp_path / "nothing")
    coco = json.loads((out / corrections.COCO).read_text())
    for image in coco["images"]:
        (out / image["file_name"]).unlink()
    with pytest.raises(ValueError, match="1 of the 1 fields in annotations.json are missing"):
        corrections.read_detection(out)
    del coco["images"][0]["boxes_complete"]  # an export written before the mark existed
    (out / corrections.COCO).write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="export again"):
        corrections.read_detection(out)
