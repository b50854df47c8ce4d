"""Train the cell detector (Faster R-CNN) on a COCO dataset folder or a Pascal VOC folder.

    python -m training.segmentation --data data/synth --output runs/seg --config cpu-demo
    python -m training.segmentation --data ../shared/data/bccd --output runs/bccd --config cpu-demo

Classes: on taxonomy (synthetic) data the detector learns `cell` vs `RBC` (the paper's
detector only finds cells; the celltype model types them); on other data (BCCD) the
dataset's own classes (`Platelets`, `RBC`, `WBC`). Splits: VOC `train` / `val`
(ImageSets/Main); COCO: the patient-grouped case split (training.common_data). The final
model is evaluated on the held-out split (`test`, or `val` for VOC sets without a test list)
with pycocotools: `map50`, `ap50_<class>`.

Reviewed fields (`--corrections DIR`, an export of `python -m training.data.corrections`):
the fields hematologists marked "boxes complete" in the review app (every cell boxed, missed
ones drawn, non-cells labelled ART) join the data, their taxonomy boxes mapped to `cell` /
`RBC`, split by accession with the config's `split_seed` / `test_fraction` /
`val_fraction` (`training.data.corrections.split_groups` over the accessions the typer
splits, so an accession falls on the same side for both jobs), and every field of a case
and of every case of its accession sits on one side only.
Fields not marked complete are never used: their unboxed cells would be learned as
background. Only with the taxonomy detector classes (`cell`, `RBC`); refused, before any
training, for a folder that is not an export, an export written before fields could be
marked complete, an export with no complete field, and fields missing on disk. What was
added (analyses and accession keys per side, images and boxes) goes to `corrections.json`
beside the weights, registered with the version; the model config records the export's
`corrections_sha256`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from training.cli import JobConfig, UsageError, job_config, job_parser, run_main
from training.common_data import (
    SYNTH_DETECTOR_CLASSES,
    DetectionItem,
    data_hash,
    dataset_items,
    detection_items,
    is_voc,
    read_rgb,
)
from training.engine import (
    AmpStep,
    build_for_training,
    device_and_amp,
    epoch_loader,
    fit,
    progress,
    seed_everything,
    train_batches,
    unsaved_predictor,
)
from training.tracking import finish, mlflow_run

log = logging.getLogger(__name__)
JOB = "segmentation"
CORRECTIONS_FILE = "corrections.json"
SPLITS = ("train", "val", "test")


class DetectionDataset:
    """torch-style dataset: (FloatTensor[3, H, W] in [0, 1], target dict with `boxes`
    FloatTensor[N, 4] x1, y1, x2, y2 and `labels` Int64Tensor[N], 1-based class index).
    `augment`: random horizontal/vertical flips (torch global RNG), training split only."""

    def __init__(
        self, items: list[DetectionItem], classes: tuple[str, ...], *, augment: bool
    ) -> None:
        self.items, self.classes, self.augment = items, classes, augment
        self.index = {c: i + 1 for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch

        item = self.items[i]
        image = torch.from_numpy(read_rgb(item.path)).permute(2, 0, 1).float().div_(255.0)
        boxes = torch.from_numpy(item.boxes.copy()).reshape(-1, 4)
        labels = torch.tensor([self.index[lab] for lab in item.labels], dtype=torch.int64)
        if self.augment:
            h, w = image.shape[1:]
            if torch.rand(()) < 0.5:
                image = image.flip(2)
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            if torch.rand(()) < 0.5:
                image = image.flip(1)
                boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        return image, {"boxes": boxes, "labels": labels}


def with_corrections(
    splits: dict[str, list[DetectionItem]],
    export_dir: Path,
    config: JobConfig,
    classes: tuple[str, ...],
) -> tuple[dict[str, list[DetectionItem]], dict[str, Any]]:
    """`splits` with the complete fields of a corrections export added, split by accession
    (module docstring), and the record written to `corrections.json`. UsageError, before
    anything is added, for every refusal the module docstring lists."""
    from training.data.corrections import (
        COCO,
        MANIFEST,
        read_detection,
        read_manifest,
        split_groups,
    )

    if tuple(classes) != SYNTH_DETECTOR_CLASSES:
        raise UsageError(
            f"--corrections: the reviewed fields carry taxonomy boxes, which map to the "
            f"detector classes {SYNTH_DETECTOR_CLASSES}; this detector learns {classes}"
        )
    try:
        dataset = read_detection(export_dir)
    except ValueError as exc:
        raise UsageError(f"--corrections: {exc}") from None
    if not dataset.images:
        raise UsageError(
            f"--corrections {export_dir}: no field in this export is marked boxes-complete, "
            "so it holds nothing for the detector (mark complete fields in the review app "
            "and export again, or leave out --corrections)"
        )
    groups = [str(im.patient_id) for im in dataset.images]
    # split over the accessions the typer splits (every one with a crop), so an accession
    # falls on the same side for both jobs
    typer_groups = {str(r["accession"]) for r in read_manifest(export_dir) if r.get("crop")}
    side = split_groups(
        sorted(typer_groups | set(groups)),
        seed=config["split_seed"],
        test_fraction=config["test_fraction"],
        val_fraction=config["val_fraction"],
    )
    items = dataset_items(dataset, {im.id for im in dataset.images}, classes)
    out = {name: list(splits.get(name, [])) for name in SPLITS}
    record: dict[str, Any] = {
        "export": str(export_dir),
        "manifest_sha256": hashlib.sha256((export_dir / MANIFEST).read_bytes()).hexdigest(),
        "annotations_sha256": hashlib.sha256((export_dir / COCO).read_bytes()).hexdigest(),
        "accessions": {name: [] for name in SPLITS},
        "analyses": {name: [] for name in SPLITS},
        "images": {name: 0 for name in SPLITS},
        "boxes": {name: 0 for name in SPLITS},
    }
    for im, group, item in zip(dataset.images, groups, items, strict=True):
        name = side[group]
        out[name].append(item)
        record["images"][name] += 1
        record["boxes"][name] += len(item.boxes)
        for key, value in (("accessions", group), ("analyses", str(im.case_id))):
            if value not in record[key][name]:
                record[key][name].append(value)
    trained = sorted({a for name in ("train", "val") for a in record["analyses"][name]})
    record["trained_analyses"] = trained
    record["held_out_analyses"] = sorted(set(record["analyses"]["test"]) - set(trained))
    log.info(
        "corrections from %s: %s complete fields, %s boxes (train/val/test)",
        export_dir,
        record["images"],
        record["boxes"],
    )
    return out, record


def detector_config(
    config: JobConfig,
    classes: tuple[str, ...],
    digest: str,
    corrections: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from marrowscope.models import make_config
    from marrowscope.models.config import DETECTOR_INT_HYPERPARAMETERS

    hp = {
        "box_detections_per_img": config["box_detections_per_img"],
        "score_threshold": config["score_threshold"],
        "lr": config["lr"],
        "momentum": config["momentum"],
        "weight_decay": config["weight_decay"],
        "lr_gamma": config["lr_gamma"],
        "epochs": config["epochs"],
        "batch_size": config["batch_size"],
    }
    # Optional RPN / RoI sampling settings (job configs without them get torchvision defaults).
    hp.update({k: config[k] for k in DETECTOR_INT_HYPERPARAMETERS if config.get(k) is not None})
    return make_config(
        "detector",
        config["arch"],
        classes=list(classes),
        min_size=config["min_size"],
        max_size=config["max_size"],
        hyperparameters=hp,
        anchor_sizes=config.get("anchor_sizes"),
        anchor_aspect_ratios=config.get("anchor_aspect_ratios"),
        training={
            "data_hash": digest,
            "seed": config["seed"],
            "config_name": config["config_name"],
            **({"corrections_sha256": corrections["manifest_sha256"]} if corrections else {}),
        },
    )


def detection_loss(model, images, targets) -> Any:
    """Sum of the Faster R-CNN losses for a batch (model in train mode)."""
    losses = model(images, targets)
    return sum(losses.values())


def predict_items(model, items: list[DetectionItem], score_threshold: float = 0.0):
    """(boxes, scores, labels) per item with a `marrowscope.inference.Detector`."""
    out = []
    for item in progress(items, desc="predict"):
        det = model.predict(read_rgb(item.path), score_threshold)
        out.append((det.boxes, det.scores, det.labels))
    return out


def evaluate_detector(
    detector, items: list[DetectionItem], classes: tuple[str, ...]
) -> dict[str, float]:
    """`map50` and `ap50_<class>` of `detector` (a `Detector`) on `items` (all scores kept)."""
    from training.evaluate_detection import detection_map

    preds = predict_items(detector, items, 0.0)
    return detection_map([(it.boxes, it.labels) for it in items], preds, classes)


def _subset(items: list, n: int) -> list:
    return items if not n or n >= len(items) else items[:: max(1, len(items) // n)][:n]


def load_items(
    args: argparse.Namespace, config: JobConfig, names: tuple[str, ...] = SPLITS
) -> tuple[dict[str, list[DetectionItem]], tuple[str, ...]]:
    """The items of the splits `names` of `--data` (a split not asked for is empty), plus the
    fields of `--corrections` when given (the corrections record goes to
    `args.corrections_record`), and the detector classes."""
    splits: dict[str, list[DetectionItem]] = {name: [] for name in SPLITS}
    classes: tuple[str, ...] = ()
    for name in dict.fromkeys(names):
        splits[name], found = detection_items(args.data, name, config, config["classes_mode"])
        if classes and found != classes:
            raise ValueError(f"split classes differ: {classes} vs {found}")
        classes = found
    args.corrections_record = None
    if getattr(args, "corrections", None):
        splits, args.corrections_record = with_corrections(
            splits, Path(args.corrections), config, classes
        )
    return splits, classes


def train(
    config: JobConfig, args: argparse.Namespace, *, trial: Any = None
) -> tuple[Any, dict, dict, tuple]:
    """Train; returns (module, detector config, held-out or validation metrics, classes)."""
    import torch

    from marrowscope.inference import Detector

    seed_everything(config["seed"])
    device, amp = device_and_amp(args.device, config["amp"])
    eval_split = "val" if trial is not None else "test"
    every = config["eval_every"] or (1 if trial is not None else 0)
    splits, classes = load_items(args, config, ("train", eval_split, *(("val",) if every else ())))
    train_items = splits["train"]
    eval_items = splits[eval_split]
    digest = data_hash(args.data)
    corrections = args.corrections_record
    model_config = detector_config(config, classes, digest, corrections)
    model = build_for_training(model_config, device, config.get("init_weights"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    step = AmpStep(optimizer, amp=amp)
    data = DetectionDataset(train_items, classes, augment=config["flips"])
    log.info(
        "detector %s, classes %s, %d train / %d %s images, device %s%s",
        config["arch"],
        classes,
        len(train_items),
        len(eval_items),
        eval_split,
        device,
        " (AMP)" if amp else "",
    )

    def train_epoch(epoch: int) -> float:
        loader = epoch_loader(
            data,
            batch_size=config["batch_size"],
            seed=config["seed"],
            epoch=epoch,
            collate_fn=lambda b: tuple(zip(*b, strict=True)),
            num_workers=config["num_workers"],
        )

        def batch_loss(batch) -> Any:
            images, targets = batch
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            warm = config["warmup_steps"]
            # linear warm-up from lr/10 over the first steps (detectors diverge otherwise)
            if warm and step.steps < warm:
                lr = config["lr"] * config["lr_gamma"] ** epoch * (0.1 + 0.9 * step.steps / warm)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            return detection_loss(model, images, targets)

        return train_batches(
            loader, batch_loss, step, desc=f"epoch {epoch + 1}", limit=config["max_steps_per_epoch"]
        )

    def wrap() -> Detector:
        return unsaved_predictor(Detector, model, model_config, device, amp)

    validate = None
    if every:
        val_items = _subset(splits["val"], config["max_eval_images"])

        def validate(epoch: int) -> dict[str, float]:
            if (epoch + 1) % every and epoch + 1 != config["epochs"]:
                return {}
            result = {
                f"val_{k}": v for k, v in evaluate_detector(wrap(), val_items, classes).items()
            }
            model.train()
            return result

    out = args.output / (f"trial-{trial.number}" if trial is not None else "")
    fit(
        model=model,
        step=step,
        scheduler=scheduler,
        epochs=config["epochs"],
        train_epoch=train_epoch,
        validate=validate,
        output=out,
        config=config.as_dict(),
        resume=args.resume,
        trial=trial,
        monitor="val_map50",
        checkpoint=trial is None,
    )
    model.eval()
    metrics = evaluate_detector(
        wrap(), _subset(eval_items, config["max_eval_images"] if trial else 0), classes
    )
    log.info("%s %s", eval_split, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if trial is None and corrections:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / CORRECTIONS_FILE).write_text(json.dumps(corrections, indent=2) + "\n")
    return model, model_config, metrics, classes


def get_args_parser() -> argparse.ArgumentParser:
    p = job_parser(JOB, __doc__)
    p.add_argument(
        "--corrections",
        type=Path,
        default=None,
        metavar="DIR",
        help="also train on the boxes-complete fields of a corrections export (python -m "
        "training.data.corrections), split by accession",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, float] | None:
    config = job_config(JOB, args)
    if args.hpo_trials:
        from training.hpo import run_hpo

        run_hpo(
            args,
            config,
            job=JOB,
            monitor="map50",
            train_trial=lambda cfg, trial: train(cfg, args, trial=trial)[2],
        )
        return None

    with mlflow_run(args, JOB, config) as run:
        model, model_config, metrics, _ = train(config, args)
        import mlflow

        mlflow.set_tag("marrowscope.data_format", "voc" if is_voc(args.data) else "coco")
        extra = []
        if args.corrections_record:
            record = args.corrections_record
            mlflow.log_params(
                {
                    "corrections_images": json.dumps(record["images"], sort_keys=True),
                    "corrections_boxes": json.dumps(record["boxes"], sort_keys=True),
                }
            )
            extra.append(args.output / CORRECTIONS_FILE)
        finish(
            kind=JOB,
            args=args,
            run=run,
            model=model,
            model_config=model_config,
            metrics=metrics,
            config=config,
            extra_files=extra,
        )
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
