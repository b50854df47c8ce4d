"""Cell-type training: loss on a fixed batch, crops as served, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.conftest import job_args
from training import celltype
from training.cli import JobConfig, load_job_config


def _config(**over) -> JobConfig:
    return JobConfig.of("celltype", {**load_job_config("celltype", "cpu-tiny"), **over})


def test_loss_decreases_on_a_fixed_batch(tiny_cohort):
    from marrowscope.models import build_model, make_config

    torch.manual_seed(0)
    data = celltype.coco_crops(tiny_cohort, "train", _config(), rbc_ratio=1.0)
    model = build_model(
        make_config(
            "celltype", "tiny_cnn", outputs=celltype.outputs(), crop_size=32, cell_head="softmax"
        )
    )
    x = torch.from_numpy(data.crops[:16]).permute(0, 3, 1, 2).float() / 255
    y, a = torch.from_numpy(data.cells[:16]), torch.from_numpy(data.attributes[:16])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = celltype.batch_loss(model, x, y, a, "softmax")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_training_crops_equal_serving_crops(tiny_cohort):
    """The celltype service/gateway path (`CellTyper.crops`) cuts the same pixels."""
    from marrowscope.inference import CellTyper
    from marrowscope.models import build_model, make_config
    from marrowscope.models.io import LoadedModel
    from training.common_data import detection_items, read_rgb

    config = _config()
    data = celltype.coco_crops(tiny_cohort, "test", config, rbc_ratio=None)
    items, _ = detection_items(tiny_cohort, "test", config, "dataset")
    mc = make_config(
        "celltype",
        "tiny_cnn",
        outputs=celltype.outputs(),
        crop_size=32,
        hyperparameters={"crop_pad_fraction": 0.1},
    )
    typer = CellTyper(LoadedModel(build_model(mc), mc, "0" * 64, tiny_cohort))
    served = np.concatenate([typer.crops(read_rgb(i.path), i.boxes) for i in items if len(i.boxes)])
    np.testing.assert_array_equal(served, data.crops)


@pytest.mark.parametrize("ema", [[], ["--set", "weight_ema=0.9"]], ids=["raw", "weight-ema"])
def test_resume_continues_at_the_right_epoch_with_identical_result(
    tiny_cohort, tmp_path, sqlite_tracking, ema
):
    """With a weight average, its state rides in the checkpoint: a resumed run saves the
    same averaged model as an uninterrupted one."""
    from marrowscope.models import load_model

    def run(out, epochs, *extra):
        return celltype.main(
            job_args(
                celltype,
                "--data",
                tiny_cohort,
                "--output",
                out,
                "--config",
                "cpu-tiny",
                "--epochs",
                epochs,
                "--no-register",
                "--tracking-uri",
                sqlite_tracking,
                *ema,
                *extra,
            )
        )

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0
    resumed = run(tmp_path / "b", 2, "--resume")
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0, 1]
    a = load_model(tmp_path / "a" / "model").module.state_dict()
    b = load_model(tmp_path / "b" / "model").module.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert straight["macro_f1"] == resumed["macro_f1"]
    # the domain check's reference is saved with the weights (issue 23 §5)
    from marrowscope.domain import DomainReference

    reference = DomainReference.load(tmp_path / "a" / "model")
    assert reference is not None and reference.threshold is not None
    assert reference.info["typer_config"] == "cpu-tiny"


def test_resume_refuses_a_changed_config(tiny_cohort, tmp_path, sqlite_tracking):
    import pytest

    from training.cli import UsageError

    celltype.main(
        job_args(
            celltype,
            "--data",
            tiny_cohort,
            "--output",
            tmp_path,
            "--config",
            "cpu-tiny",
            "--no-register",
            "--tracking-uri",
            sqlite_tracking,
        )
    )
    with pytest.raises(UsageError, match="lr"):
        celltype.main(
            job_args(
                celltype,
                "--data",
                tiny_cohort,
                "--output",
                tmp_path,
                "--config",
                "cpu-tiny",
                "--epochs",
                "2",
                "--set",
                "lr=0.1",
                "--resume",
                "--no-register",
                "--tracking-uri",
                sqlite_tracking,
            )
        )


def test_a_mixed_validation_split_is_also_scored_per_source():
    """DeepAPL cells all right, PBC cells all wrong: the pooled figure hides what each source
    says; a single-source split adds nothing."""
    from training.celltype import CropSet, outputs, per_source_macro_f1

    cells = np.array([0, 1, 0, 1, 0, 1])
    probs = np.zeros((6, len(outputs())), np.float32)
    probs[np.arange(6), [0, 1, 0, 1, 1, 0]] = 1.0  # the last two (PBC) swapped
    sources = np.array(["deepapl"] * 4 + ["pbc"] * 2)
    data = CropSet(np.zeros((6, 1, 1, 3), np.uint8), cells, None, None, sources)
    out = per_source_macro_f1(probs, data, prefix="val_")
    assert out == {"val_macro_f1_deepapl": 1.0, "val_macro_f1_pbc": 0.0}
    one = CropSet(data.crops, cells, None, None, np.array(["deepapl"] * 6))
    assert per_source_macro_f1(probs, one, prefix="val_") == {}
