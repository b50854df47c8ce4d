"""Detector training: loss on a fixed batch, flag checks, a tiny end-to-end run."""

from __future__ import annotations

import pytest
import torch

from tests.training.conftest import job_args
from training import segmentation
from training.cli import UsageError
from training.common_data import detection_items


def test_loss_decreases_on_a_fixed_batch(tiny_cohort):
    from marrowscope.models import build_model, make_config
    from training.cli import JobConfig, load_job_config

    torch.manual_seed(0)
    config = JobConfig.of("segmentation", load_job_config("segmentation", "cpu-tiny"))
    items, classes = detection_items(tiny_cohort, "train", config)
    assert classes == ("cell", "RBC")
    data = segmentation.DetectionDataset(items[:2], classes, augment=False)
    images, targets = zip(*[data[i] for i in range(2)], strict=True)
    model = build_model(
        make_config(
            "detector",
            "fasterrcnn_mobilenet_v3_large_fpn",
            classes=list(classes),
            min_size=120,
            max_size=160,
        )
    )
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = segmentation.detection_loss(model, list(images), list(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_flips_move_boxes_with_the_image(tiny_cohort):
    from training.cli import JobConfig, load_job_config

    config = JobConfig.of("segmentation", load_job_config("segmentation", "cpu-tiny"))
    items, classes = detection_items(tiny_cohort, "train", config)
    item = next(i for i in items if len(i.boxes))
    plain = segmentation.DetectionDataset([item], classes, augment=False)[0]
    torch.manual_seed(1)
    flipped = [segmentation.DetectionDataset([item], classes, augment=True)[0] for _ in range(8)]
    w, h = plain[0].shape[2], plain[0].shape[1]
    for _image, target in flipped:
        b, p = target["boxes"], plain[1]["boxes"]
        assert torch.allclose((b[:, 2] - b[:, 0]), (p[:, 2] - p[:, 0]))
        assert ((b[:, [0, 2]] >= 0) & (b[:, [0, 2]] <= w)).all() and (
            (b[:, [1, 3]] >= 0) & (b[:, [1, 3]] <= h)
        ).all()
    assert any(not torch.equal(img, plain[0]) for img, _ in flipped)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hpo-trials", "2"], "--study"),
        (["--study", "s"], "only make sense"),
        (["--promote", "--no-register"], "--promote"),
        (["--epochs", "0"], "--epochs"),
        (["--set", "nosuchkey=1"], "unknown key"),
    ],
)
def test_bad_flags_are_rejected_before_any_work(tiny_cohort, tmp_path, flags, message):
    out = tmp_path / "out"
    args = job_args(
        segmentation, "--data", tiny_cohort, "--output", out, "--config", "cpu-tiny", *flags
    )
    with pytest.raises(UsageError, match=message):
        segmentation.main(args)
    assert not out.exists()


def test_tiny_run_evaluates_on_held_out_cases(tiny_cohort, tmp_path, sqlite_tracking):
    args = job_args(
        segmentation,
        "--data",
        tiny_cohort,
        "--output",
        tmp_path,
        "--config",
        "cpu-tiny",
        "--tracking-uri",
        sqlite_tracking,
        "--no-register",
    )
    metrics = segmentation.main(args)
    assert set(metrics) >= {"map50", "ap50_cell", "ap50_RBC"}
    assert 0.0 <= metrics["map50"] <= 1.0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint.pt").is_file()


# -- reviewed fields from a corrections export ----------------------------------------------


def make_detection_export(root, cohort, groups: dict[str, str], *, per_case: int = 2):
    """A corrections export as `training.data.corrections export` writes its detection part:
    fields of the cohort (taxonomy boxes) as complete fields of analyses `groups` (analysis
    -> accession key), `per_case` each, with a manifest and export.json."""
    import json
    import shutil

    from training.data import corrections
    from training.data.coco import Dataset, ImageRecord, read_coco, write_coco

    source = read_coco(cohort / "annotations.json")
    by_image = source.annotations_by_image()
    pool = iter(source.images)
    images, annotations, lines = [], [], []
    (root / "images").mkdir(parents=True)
    for analysis, accession in groups.items():
        for index in range(per_case):
            im = next(pool)
            name = f"images/{analysis}-{index}.png"
            shutil.copyfile(source.image_path(im), root / name)
            record = ImageRecord(
                id=len(images) + 1, file_name=name, width=im.width, height=im.height,
                case_id=analysis, patient_id=accession,
                extra={"image": index, "boxes_complete": True},
            )  # fmt: skip
            images.append(record)
            for a in by_image[im.id]:
                annotations.append(
                    a.__class__(id=len(annotations) + 1, image_id=record.id,
                                category=a.category, bbox=a.bbox)
                )  # fmt: skip
                lines.append({"analysis_id": analysis, "accession": accession, "crop": None})
    write_coco(Dataset(images, annotations, root=root), root / corrections.COCO)
    (root / corrections.MANIFEST).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / corrections.SUMMARY).write_text("{}")
    return root


GROUPS = {"a1": "acc-A", "a2": "acc-A", "a3": "acc-B", "a4": "acc-C", "a5": "acc-D"}


def _config():
    from training.cli import JobConfig, load_job_config

    return JobConfig.of("segmentation", load_job_config("segmentation", "cpu-tiny"))


def test_reviewed_fields_join_the_splits_with_each_accession_on_one_side(tiny_cohort, tmp_path):
    import json

    from training.data.corrections import split_groups

    export = make_detection_export(tmp_path / "export", tiny_cohort, GROUPS)
    with (export / "manifest.jsonl").open("a") as manifest:  # a crop-only accession
        manifest.write(json.dumps({"analysis_id": "a9", "accession": "acc-Z", "crop": "x"}) + "\n")
    base = {name: detection_items(tiny_cohort, name, _config())[0] for name in segmentation.SPLITS}
    splits, record = segmentation.with_corrections(base, export, _config(), ("cell", "RBC"))
    typer_sides = split_groups(
        [*GROUPS.values(), "acc-Z"], seed=0, test_fraction=0.25, val_fraction=0.25
    )
    for name in segmentation.SPLITS:  # where the typer puts an accession, the detector does
        assert all(typer_sides[g] == name for g in record["accessions"][name])
    side: dict[str, set[str]] = {}
    for name, items in splits.items():
        assert items[: len(base[name])] == base[name], "the usual data changed"
        added = items[len(base[name]) :]
        assert len(added) == record["images"][name]
        for item in added:
            assert item.path.parent == export / "images"
            assert set(item.labels) <= {"cell", "RBC"} and len(item.labels) == len(item.boxes)
            side.setdefault(GROUPS[item.case_id], set()).add(name)
    assert all(len(s) == 1 for s in side.values()), side
    assert len(side) == 4 and record["images"]["train"] > 0 and record["images"]["test"] > 0
    assert {"a1", "a2"} <= set(record["trained_analyses"]) or {"a1", "a2"} <= set(
        record["held_out_analyses"]
    ), "one accession split in two"
    assert sum(record["images"].values()) == 2 * len(GROUPS)


def test_corrections_that_cannot_train_the_detector_are_refused(tiny_cohort, tmp_path):
    import json

    config, classes = _config(), ("cell", "RBC")
    base = {name: [] for name in segmentation.SPLITS}
    with pytest.raises(UsageError, match="not a corrections export"):
        segmentation.with_corrections(base, tmp_path, config, classes)
    export = make_detection_export(tmp_path / "export", tiny_cohort, {"a1": "acc-A"})
    with pytest.raises(UsageError, match="this detector learns"):
        segmentation.with_corrections(base, export, config, ("Platelets", "RBC", "WBC"))
    coco = json.loads((export / "annotations.json").read_text())
    (export / coco["images"][1]["file_name"]).unlink()
    with pytest.raises(UsageError, match="1 of the 2 fields .* missing on disk"):
        segmentation.with_corrections(base, export, config, classes)
    (export / "annotations.json").write_text(json.dumps({**coco, "images": [], "annotations": []}))
    with pytest.raises(UsageError, match="no field in this export is marked boxes-complete"):
        segmentation.with_corrections(base, export, config, classes)
    assert base == {name: [] for name in segmentation.SPLITS}, "refusals added something"


def test_tiny_run_trains_on_reviewed_fields_and_records_them(
    tiny_cohort, tmp_path, sqlite_tracking
):
    import json

    export = make_detection_export(tmp_path / "export", tiny_cohort, GROUPS, per_case=1)
    out = tmp_path / "run"
    args = job_args(
        segmentation, "--data", tiny_cohort, "--output", out, "--config", "cpu-tiny",
        "--tracking-uri", sqlite_tracking, "--no-register", "--corrections", export,
    )  # fmt: skip
    metrics = segmentation.main(args)
    assert metrics is not None and "map50" in metrics
    record = json.loads((out / "corrections.json").read_text())
    assert record["images"]["train"] > 0
    sides = [set(record["accessions"][name]) for name in segmentation.SPLITS]
    assert all(a.isdisjoint(b) for i, a in enumerate(sides) for b in sides[i + 1 :])
    assert json.loads((out / "model" / "corrections.json").read_text()) == record
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["training"]["corrections_sha256"] == record["manifest_sha256"]
