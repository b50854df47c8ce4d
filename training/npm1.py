"""Train the NPM1 classifier (paper: ResNet50 on whole images) on AML cases only.

    python -m training.npm1 --data data/synth --output runs/npm1 --config cpu-demo

As in the paper only AML cases with a known NPM1 status are used. Every image of a case
carries the case's label; the case probability is the mean over its images (as the
gateway computes it). Augmentation -- mirroring, random crop + resize, colour jitter --
is applied only to the training fold, after the patient-grouped split; validation and
test images are only resized (`Npm1Predictor.prepare`, the serving path). SGD with
momentum and an exponential learning-rate decay (the paper's searched hyper-parameters).
Metrics on held-out test cases: `auroc` (+ bootstrap 95 % CI), `pr_auc`, `brier`,
`accuracy`; config `cv_folds` adds case-grouped k-fold CV (5 in the paper config).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import JobConfig, UsageError, job_config, job_parser, run_main
from training.common_data import data_hash
from training.engine import (
    AmpStep,
    build_for_training,
    device_and_amp,
    epoch_loader,
    fit,
    seed_everything,
    train_batches,
    unsaved_predictor,
)
from training.tracking import finish, mlflow_run

log = logging.getLogger(__name__)
JOB = "npm1"


def aml_records(records: list) -> list:
    """AML cases with a known NPM1 status (controls and unknown status are left out)."""
    return [r for r in records if r.aml_label == 1 and r.npm1_label is not None]


class Npm1Images:
    """Images of some cases at `input_size` (H, W): (FloatTensor[3, H, W] in [0, 1], label).

    `augment=False` gives exactly the serving input (`resize_for_model`); `augment=True`
    (training fold only) draws a random crop (area `crop_scale`, aspect near the input's),
    resizes it, mirrors horizontally/vertically and jitters colour, with torch's global RNG.
    """

    def __init__(
        self,
        data_dir: Path,
        records: list,
        input_size: tuple[int, int],
        *,
        augment: bool,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        jitter: float = 0.2,
    ) -> None:
        from marrowscope.imaging import resize_for_model
        from training.common_data import read_rgb

        self.input_size, self.augment = tuple(input_size), augment
        h, w = self.input_size
        # Augmentation crops from a copy at twice the input size: enough detail for a 0.5x crop.
        cache_hw = (2 * h, 2 * w) if augment else (h, w)
        self.images, self.labels, self.cases = [], [], []
        for r in records:
            for p in r.image_paths:
                self.images.append(resize_for_model(read_rgb(Path(data_dir) / p), cache_hw))
                self.labels.append(float(r.npm1_label))
                self.cases.append(r.case_id)
        self.transform = None
        if augment:
            from torchvision.transforms import v2

            ratio = w / h
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(
                        (h, w),
                        scale=tuple(crop_scale),
                        ratio=(ratio * 0.9, ratio / 0.9),
                        antialias=True,
                    ),
                    v2.RandomHorizontalFlip(),
                    v2.RandomVerticalFlip(),
                    v2.ColorJitter(
                        brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 10
                    ),
                ]
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch

        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x).clamp_(0.0, 1.0)
        return x, torch.tensor(self.labels[i])


def case_scores(predictor, data: Npm1Images, batch_size: int = 16) -> tuple[list[str], np.ndarray]:
    """(case ids, P(NPM1) per case = mean over its images) with an `Npm1Predictor`."""
    probs = (
        np.concatenate(
            [
                predictor.predict(np.stack(data.images[i : i + batch_size]))
                for i in range(0, len(data), batch_size)
            ]
        )
        if len(data)
        else np.zeros(0)
    )
    cases = list(dict.fromkeys(data.cases))
    by_case = np.array(
        [probs[[j for j, c in enumerate(data.cases) if c == case]].mean() for case in cases]
    )
    return cases, by_case


def train(
    config: JobConfig,
    args: argparse.Namespace,
    train_records: list,
    val_records: list,
    *,
    trial: Any = None,
    output: Path | None = None,
    checkpoint: bool = True,
):
    """Fit on `train_records`; returns (module, model config, predictor factory)."""
    import torch
    import torch.nn.functional as F

    from marrowscope.inference import Npm1Predictor
    from marrowscope.models import make_config

    seed_everything(config["seed"])
    device, amp = device_and_amp(args.device, config["amp"])
    size = tuple(config["input_size"])
    hp = {
        k: config[k]
        for k in (
            "lr",
            "lr_gamma",
            "momentum",
            "weight_decay",
            "epochs",
            "batch_size",
            "crop_scale",
            "jitter",
        )
    }
    model_config = make_config(
        "npm1",
        config["arch"],
        input_size=list(size),
        hyperparameters=hp,
        training={
            "data_hash": data_hash(args.data),
            "seed": config["seed"],
            "config_name": config["config_name"],
        },
    )
    model = build_for_training(model_config, device, config.get("init_weights"))
    train_data = Npm1Images(
        args.data,
        train_records,
        size,
        augment=True,
        crop_scale=config["crop_scale"],
        jitter=config["jitter"],
    )
    val_data = Npm1Images(args.data, val_records, size, augment=False) if val_records else None
    log.info(
        "npm1 %s at %s: %d training images (%d cases), %d validation cases, device %s%s",
        config["arch"],
        size,
        len(train_data),
        len(train_records),
        len(val_records),
        device,
        " (AMP)" if amp else "",
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    step = AmpStep(optimizer, amp=amp)

    def batch_loss(batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x.to(device)).float(), y.to(device))

    def train_epoch(epoch: int) -> float:
        loader = epoch_loader(
            train_data,
            batch_size=config["batch_size"],
            seed=config["seed"],
            epoch=epoch,
            num_workers=0,
            drop_last=len(train_data) > config["batch_size"],
        )
        return train_batches(
            loader, batch_loss, step, desc=f"epoch {epoch + 1}", limit=config["max_steps_per_epoch"]
        )

    def predictor() -> Npm1Predictor:
        return unsaved_predictor(Npm1Predictor, model, model_config, device, amp)

    validate = None
    if val_data is not None and len({r.npm1_label for r in val_records}) == 2:
        from sklearn.metrics import roc_auc_score

        val_y = {r.case_id: r.npm1_label for r in val_records}

        def validate(epoch: int) -> dict[str, float]:
            cases, scores = case_scores(predictor(), val_data)
            model.train()
            return {"val_auroc": float(roc_auc_score([val_y[c] for c in cases], scores))}

    fit(
        model=model,
        step=step,
        scheduler=scheduler,
        epochs=config["epochs"],
        train_epoch=train_epoch,
        validate=validate,
        output=output or args.output,
        config=config.as_dict(),
        resume=args.resume and checkpoint,
        trial=trial,
        monitor="val_auroc",
        checkpoint=checkpoint,
    )
    model.eval()
    return model, model_config, predictor


def evaluate_cases(
    predictor, data_dir: Path, records: list, config: JobConfig
) -> tuple[dict, np.ndarray, np.ndarray]:
    from training.evaluate_metrics import binary_report

    data = Npm1Images(data_dir, records, predictor.input_size, augment=False)
    cases, scores = case_scores(predictor, data)
    labels = {r.case_id: r.npm1_label for r in records}
    y = np.array([labels[c] for c in cases])
    return binary_report(y, scores, n_boot=config["n_boot"], seed=config["seed"]), y, scores


def cross_validate(config: JobConfig, args: argparse.Namespace, records: list) -> dict[str, float]:
    """Case-grouped k-fold CV over `records` (k = config `cv_folds`): AUROC mean/std."""
    from sklearn.metrics import roc_auc_score

    from training.data.splits import grouped_kfold

    if not config["cv_folds"]:
        return {}
    by_id = {r.case_id: r for r in records}
    aurocs = []
    for f, (tr, va) in enumerate(
        grouped_kfold(
            records, config["cv_folds"], seed=config["split_seed"], stratify_by="npm1_status"
        )
    ):
        _, _, predictor = train(
            config,
            args,
            [by_id[c] for c in tr],
            [],
            output=args.output / f"cv-{f}",
            checkpoint=False,
        )
        val = [by_id[c] for c in va]
        cases, scores = case_scores(
            predictor(), Npm1Images(args.data, val, tuple(config["input_size"]), augment=False)
        )
        y = [by_id[c].npm1_label for c in cases]
        if len(set(y)) == 2:
            aurocs.append(roc_auc_score(y, scores))
    log.info("%d-fold grouped CV AUROC: %s", config["cv_folds"], [round(a, 4) for a in aurocs])
    return (
        {
            "cv_auroc_mean": float(np.mean(aurocs)),
            "cv_auroc_std": float(np.std(aurocs)),
            "cv_folds": float(config["cv_folds"]),
        }
        if aurocs
        else {}
    )


def get_args_parser() -> argparse.ArgumentParser:
    return job_parser(JOB, __doc__)


def main(args: argparse.Namespace) -> dict[str, float] | None:
    config = job_config(JOB, args)
    from training.common_data import load_cases

    records = aml_records(load_cases(args.data, config))
    splits = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
    for s, rs in splits.items():
        if not rs:
            raise UsageError(f"no AML cases with NPM1 status in split {s!r}")
    log.info("AML cases with NPM1 status: %s", {s: len(rs) for s, rs in splits.items()})
    if args.hpo_trials:
        from training.hpo import run_hpo

        def trial_fn(cfg: JobConfig, trial) -> dict[str, float]:
            _, _, predictor = train(
                cfg,
                args,
                splits["train"],
                splits["val"],
                trial=trial,
                output=args.output / f"trial-{trial.number}",
                checkpoint=False,
            )
            return evaluate_cases(predictor(), args.data, splits["val"], cfg)[0]

        run_hpo(args, config, job=JOB, monitor="auroc", train_trial=trial_fn)
        return None

    from training.evaluate_metrics import binary_plots, log_plots

    with mlflow_run(args, JOB, config) as run:
        cv = cross_validate(config, args, splits["train"] + splits["val"])
        model, model_config, predictor = train(config, args, splits["train"], splits["val"])
        metrics, y, scores = evaluate_cases(predictor(), args.data, splits["test"], config)
        metrics.update(cv)
        log_plots(
            binary_plots(y, scores, args.output / "plots", prefix="npm1_", title="NPM1 (test)")
        )
        log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        finish(
            kind=JOB,
            args=args,
            run=run,
            model=model,
            model_config=model_config,
            metrics=metrics,
            config=config,
        )
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
