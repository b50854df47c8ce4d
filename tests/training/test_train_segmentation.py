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
