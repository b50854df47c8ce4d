"""Train the cell-type / attribute classifier on crops cut from COCO annotations, or on a
single-cell ImageFolder set (ROOT/<CODE>/*.png, e.g. Matek et al.'s layout).

    python -m training.celltype --data data/synth --output runs/celltype --config cpu-demo

Crops: `marrowscope.imaging.crop_cells` with the serving crop size and padding
(`marrowscope.imaging.CELL_CROP_PAD_FRACTION`, recorded in the config), so training and
serving cut cells identically. Outputs: every taxonomy code (RBC included, so a detector
false positive on a red cell is typed RBC and not counted) then every attribute.
ImageFolder sets carry no patients: they are split at random, stratified by class, and the
attribute heads are not trained. Metrics (held-out split): `macro_f1`, `accuracy`,
`f1_<code>`, `auroc_<attr>`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.common import (
    MODEL_SUBDIR,
    JobConfig,
    UsageError,
    add_common_args,
    amp_context,
    build_job_config,
    check_args,
    data_hash,
    device_and_amp,
    finish,
    fit,
    mlflow_run,
    progress,
    run_main,
    seed_everything,
)

log = logging.getLogger(__name__)
JOB = "celltype"


@dataclass
class CropSet:
    crops: np.ndarray
    """uint8[N, S, S, 3]."""
    cells: np.ndarray
    """int64[N] index into the cell codes of the outputs."""
    attributes: np.ndarray | None
    """float32[N, A] 0/1, None when the source has no attribute labels."""


def outputs() -> list[str]:
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES

    return [*CODES, *ATTRIBUTE_CODES]


def coco_crops(data_dir, split: str, config: JobConfig, *, rbc_ratio: float | None) -> CropSet:
    """Crops of every annotated cell of the split's images (RBCs capped at `rbc_ratio` x
    the nucleated count when given, chosen with the seed)."""
    from marrowscope.imaging import CELL_CROP_PAD_FRACTION, crop_cells
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES
    from training.common_data import detection_items, read_rgb

    items, _ = detection_items(data_dir, split, config, "dataset")
    crops, cells, attrs = [], [], []
    for item in progress(items, desc=f"crops {split}"):
        if not len(item.boxes):
            continue
        unknown = sorted({c for c in item.codes if c not in CODES})
        if unknown:
            raise UsageError(f"{item.path}: categories {unknown} are not taxonomy codes")
        crops.append(
            crop_cells(read_rgb(item.path), item.boxes, config["crop_size"], CELL_CROP_PAD_FRACTION)
        )
        cells += [CODES.index(c) for c in item.codes]
        attrs += [[float(a.get(k, False)) for k in ATTRIBUTE_CODES] for a in item.attributes]
    if not cells:
        raise UsageError(f"{data_dir}: no annotated cells in split {split!r}")
    out = CropSet(
        np.concatenate(crops), np.array(cells, dtype=np.int64), np.array(attrs, dtype=np.float32)
    )
    if rbc_ratio is not None:
        rbc = CODES.index("RBC")
        is_rbc = out.cells == rbc
        cap = int(rbc_ratio * max(1, (~is_rbc).sum()))
        rng = np.random.default_rng(config["seed"])
        keep_rbc = rng.permutation(np.flatnonzero(is_rbc))[:cap]
        keep = np.sort(np.concatenate([np.flatnonzero(~is_rbc), keep_rbc]))
        out = CropSet(out.crops[keep], out.cells[keep], out.attributes[keep])
    log.info(
        "%s: %d crops (%s)",
        split,
        len(out.cells),
        ", ".join(
            f"{CODES[i]} {n}"
            for i, n in zip(*np.unique(out.cells, return_counts=True), strict=True)
        ),
    )
    return out


def imagefolder_crops(data_dir, config: JobConfig) -> dict[str, CropSet]:
    """train/val/test CropSets from a single-cell ImageFolder (random stratified split)."""
    from sklearn.model_selection import train_test_split

    from marrowscope.imaging import resize_for_model
    from marrowscope.taxonomy import CODES
    from training.data.imagefolder import iter_imagefolder, read_imagefolder

    items = read_imagefolder(data_dir)
    size = (config["crop_size"], config["crop_size"])
    crops = np.stack([resize_for_model(im, size) for im, _ in iter_imagefolder(items)])
    cells = np.array([CODES.index(c) for _, c in items], dtype=np.int64)
    idx = np.arange(len(cells))
    strat = cells if np.bincount(cells).max() > 1 and min(np.bincount(cells)[cells]) > 2 else None
    rest, test = train_test_split(
        idx, test_size=config["test_fraction"], random_state=config["split_seed"], stratify=strat
    )
    rel = config["val_fraction"] / (1 - config["test_fraction"])
    train, val = train_test_split(
        rest,
        test_size=rel,
        random_state=config["split_seed"],
        stratify=None if strat is None else cells[rest],
    )
    return {
        name: CropSet(crops[i], cells[i], None)
        for name, i in (("train", train), ("val", val), ("test", test))
    }


def load_splits(data_dir, config: JobConfig) -> dict[str, CropSet]:
    if (data_dir / "annotations.json").is_file():
        ratio = config["max_rbc_ratio"]
        return {
            "train": coco_crops(data_dir, "train", config, rbc_ratio=ratio),
            "val": coco_crops(data_dir, "val", config, rbc_ratio=None),
            "test": coco_crops(data_dir, "test", config, rbc_ratio=None),
        }
    return imagefolder_crops(data_dir, config)


def batch_loss(model, x, cells, attributes, cell_head: str):
    """Training loss of a batch: x FloatTensor[B, 3, S, S] in [0, 1]."""
    from marrowscope.models.celltype import celltype_loss

    logits = model(x)
    if attributes is None:  # no attribute labels: train the cell part only
        return celltype_loss(logits[:, : model.n_cells], cells, None, cell_head=cell_head)
    return celltype_loss(logits, cells, attributes, cell_head=cell_head)


def augment(x):
    """Random flips and 90-degree rotations of a batch [B, 3, S, S] (training split only)."""
    import torch

    if torch.rand(()) < 0.5:
        x = x.flip(3)
    if torch.rand(()) < 0.5:
        x = x.flip(2)
    return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(2, 3))


def evaluate_probs(probs: np.ndarray, data: CropSet) -> dict[str, float]:
    """Cell metrics from probabilities float[N, K] in `outputs()` order."""
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES
    from training.evaluate_metrics import celltype_report

    pred = probs[:, : len(CODES)].argmax(1)
    y_true = [CODES[i] for i in data.cells]
    y_pred = [CODES[i] for i in pred]
    attr_true, attr_score = {}, {}
    if data.attributes is not None:
        for j, a in enumerate(ATTRIBUTE_CODES):
            attr_true[a], attr_score[a] = data.attributes[:, j], probs[:, len(CODES) + j]
    return celltype_report(y_true, y_pred, attr_true, attr_score)


def train(
    config: JobConfig,
    args: argparse.Namespace,
    *,
    trial: Any = None,
    splits: dict[str, CropSet] | None = None,
) -> tuple[Any, dict, dict]:
    import torch

    from marrowscope.imaging import CELL_CROP_PAD_FRACTION
    from marrowscope.inference import CellTyper
    from marrowscope.models import LoadedModel, build_model, make_config

    seed_everything(config["seed"])
    device, amp = device_and_amp(args.device, config["amp"])
    splits = splits or load_splits(args.data, config)
    hp = {
        "head_dropout": config["dropout"],
        "crop_pad_fraction": CELL_CROP_PAD_FRACTION,
        "lr": config["lr"],
        "weight_decay": config["weight_decay"],
        "lr_gamma": config["lr_gamma"],
        "epochs": config["epochs"],
    }
    model_config = make_config(
        "celltype",
        config["arch"],
        outputs=outputs(),
        crop_size=config["crop_size"],
        cell_head=config["cell_head"],
        hyperparameters=hp,
        training={
            "data_hash": data_hash(args.data),
            "seed": config["seed"],
            "config_name": config["config_name"],
        },
    )
    model = build_model(model_config)
    if config.get("init_weights"):
        from marrowscope.models.weights import load_initial_weights

        load_initial_weights(model, model_config, config["init_weights"], scope="backbone")
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    scaler = torch.amp.GradScaler("cuda") if amp else None
    tr = splits["train"]
    x_all = torch.from_numpy(tr.crops)
    y_all = torch.from_numpy(tr.cells)
    a_all = None if tr.attributes is None else torch.from_numpy(tr.attributes)

    def train_epoch(epoch: int) -> float:
        g = torch.Generator().manual_seed(config["seed"] * 7919 + epoch)
        order = torch.randperm(len(y_all), generator=g)
        batches = order.split(config["batch_size"])
        limit = config["max_steps_per_epoch"] or len(batches)
        total = 0.0
        for idx in progress(batches[:limit], desc=f"epoch {epoch + 1}"):
            x = augment(x_all[idx].permute(0, 3, 1, 2).float().div(255.0)).to(device)
            with amp_context(amp):
                loss = batch_loss(
                    model,
                    x,
                    y_all[idx].to(device),
                    None if a_all is None else a_all[idx].to(device),
                    config["cell_head"],
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total += loss.item()
        return total / max(1, min(limit, len(batches)))

    def typer() -> CellTyper:
        from pathlib import Path

        return CellTyper(
            LoadedModel(model, model_config, "0" * 64, Path(".")),
            device=device.type,
            autocast="fp16" if amp else "none",
        )

    def validate(epoch: int) -> dict[str, float]:
        m = evaluate_probs(typer().predict(splits["val"].crops), splits["val"])
        model.train()
        return {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"]}

    out = args.output / (f"trial-{trial.number}" if trial is not None else "")
    fit(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=config["epochs"],
        train_epoch=train_epoch,
        validate=validate if len(splits["val"].cells) else None,
        output=out,
        config=config.as_dict(),
        resume=args.resume,
        scaler=scaler,
        trial=trial,
        monitor="val_macro_f1",
        checkpoint=trial is None,
    )
    model.eval()
    held_out = splits["val"] if trial is not None else splits["test"]
    metrics = evaluate_probs(typer().predict(held_out.crops), held_out)
    log.info(
        "%s %s",
        "val" if trial is not None else "test",
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    return model, model_config, metrics


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.celltype",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_common_args(p)


def main(args: argparse.Namespace) -> dict[str, float] | None:
    check_args(args)
    config = build_job_config(JOB, args)
    if args.hpo_trials:
        from training.hpo import run_hpo

        splits = load_splits(args.data, config)
        run_hpo(
            args,
            config,
            job=JOB,
            monitor="macro_f1",
            train_trial=lambda cfg, trial: train(cfg, args, trial=trial, splits=splits)[2],
        )
        return None
    from marrowscope.models import save_model

    with mlflow_run(args, JOB, config) as run:
        model, model_config, metrics = train(config, args)
        model_dir = save_model(model, model_config, args.output / MODEL_SUBDIR)
        finish(
            kind=JOB,
            args=args,
            run=run,
            model_dir=model_dir,
            metrics=metrics,
            config=config,
            data_digest=model_config["training"]["data_hash"],
        )
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
