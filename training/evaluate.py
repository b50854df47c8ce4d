"""Evaluate a model (registered version or directory) on a dataset folder.

    python -m training.evaluate detection --model models:/marrowscope-segmentation@champion --data ../shared/data/bccd
    python -m training.evaluate celltype  --model runs/celltype/model --data data/synth
    python -m training.evaluate npm1      --model models:/marrowscope-npm1/3 --data data/synth
    python -m training.evaluate ensemble  --model models:/marrowscope-ensemble/2 --data data/synth
    python -m training.evaluate corrections --export DIR [--typer RUN]

`corrections` (training/evaluate_corrections.py) reads a corrections export of the review
app: reviewer agreement per celltype version, and a candidate typer's accuracy (beside the
champion's) on the corrected cells it has not trained on.

The last line of stdout is one JSON object with the metrics under their fixed names
(training/README.md): detection `map50` + `ap50_<class>` (pycocotools, IoU 0.5, also as an
`ap50` object); celltype `macro_f1`, `accuracy`, `f1_<code>`, `auroc_<attr>`; npm1 and
ensemble `auroc`, `auroc_ci_low`, `auroc_ci_high`, `pr_auc`, `brier`, `accuracy`, ... with
bootstrap 95 % CIs. An ensemble with the npm1 output (config `targets`) also reports it on
the AML cases of known NPM1 status: every binary name prefixed `npm1_` (`npm1_auroc`, ...).
`--split auto` is VOC `val` (BCCD ships no test list) or the held-out `test` cases of a COCO
folder (patient-grouped split of `--config`). The ensemble is fed by
the segmentation/celltype versions recorded in its lineage unless given. `--mlflow` logs
the metrics and the ROC/PR/calibration/confusion PNGs to a run in `marrowscope-evaluate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import JobConfig, UsageError, load_job_config

log = logging.getLogger(__name__)
KINDS = ("detection", "celltype", "npm1", "ensemble")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=KINDS)
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory",
    )
    p.add_argument(
        "--data", type=Path, required=True, help="COCO dataset folder or Pascal VOC folder"
    )
    p.add_argument("--split", default="auto", choices=("auto", "train", "val", "test"))
    p.add_argument(
        "--config", default="cpu-demo", help="config whose split settings define the case split"
    )
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--segmentation", default=None, help="ensemble: segmentation URI (default: its lineage)"
    )
    p.add_argument("--celltype", default=None, help="ensemble: celltype URI (default: its lineage)")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.add_argument("--mlflow", action="store_true", help="log metrics and plots to MLflow")
    return p


def _split(args: argparse.Namespace) -> str:
    from training.common_data import is_voc

    if args.split != "auto":
        return args.split
    return "val" if is_voc(args.data) else "test"


def evaluate_detection(predictor, data: Path, split: str, config: JobConfig) -> dict[str, Any]:
    from training.common_data import detection_items
    from training.segmentation import evaluate_detector

    items, classes = detection_items(data, split, config, "auto")
    if set(classes) != set(predictor.classes):
        items, classes = detection_items(data, split, config, "dataset")
    if not set(classes) <= set(predictor.classes):
        raise UsageError(
            f"dataset classes {list(classes)} do not match the detector's {list(predictor.classes)}"
        )
    metrics = evaluate_detector(predictor, items, tuple(predictor.classes))
    return {
        **metrics,
        "ap50": {k.removeprefix("ap50_"): v for k, v in metrics.items() if k.startswith("ap50_")},
        "images": len(items),
    }


def evaluate_celltype(predictor, data: Path, split: str, config: JobConfig) -> dict[str, Any]:
    from training.celltype import coco_crops, evaluate_probs

    crops = coco_crops(
        data,
        split,
        JobConfig.of("celltype", {**config.as_dict(), "crop_size": predictor.crop_size}),
        rbc_ratio=None,
    )
    return evaluate_probs(predictor.predict(crops.crops), crops)


def _binary(y, scores, args, config, prefix: str, title: str) -> dict[str, Any]:
    from training.evaluate_metrics import binary_plots, binary_report

    metrics = binary_report(
        y, scores, n_boot=config.get("n_boot", 1000), seed=config.get("seed", 0)
    )
    if args.plots or args.mlflow:
        args._plot_paths = [
            *getattr(args, "_plot_paths", []),
            *binary_plots(y, scores, args.plots or Path("plots"), prefix=prefix, title=title),
        ]
    return metrics


def evaluate_npm1(predictor, args, split: str, config: JobConfig) -> dict[str, Any]:
    from training.common_data import load_cases
    from training.npm1 import Npm1Images, aml_records, case_scores

    records = [r for r in aml_records(load_cases(args.data, config)) if r.split == split]
    cases, scores = case_scores(
        predictor, Npm1Images(args.data, records, predictor.input_size, augment=False)
    )
    labels = {r.case_id: r.npm1_label for r in records}
    return _binary(
        np.array([labels[c] for c in cases]), scores, args, config, "npm1_", f"NPM1 ({split})"
    )


def evaluate_ensemble(
    predictor, args, split: str, config: JobConfig, lineage: dict[str, str]
) -> dict[str, Any]:
    from marrowscope.inference import load_predictor
    from training.common_data import load_cases
    from training.ensemble import case_feature_table

    uris = {}
    for kind, flag in (("segmentation", args.segmentation), ("celltype", args.celltype)):
        if flag is None and kind not in lineage:
            raise UsageError(f"the ensemble records no {kind} lineage; pass --{kind}")
        uris[kind] = flag or f"models:/marrowscope-{kind}/{lineage[kind]}"
    seg = load_predictor(uris["segmentation"], tracking_uri=args.tracking_uri)
    cel = load_predictor(uris["celltype"], tracking_uri=args.tracking_uri)
    records = [r for r in load_cases(args.data, config) if r.split == split]
    names, table = case_feature_table(args.data, records, seg, cel)
    probs = predictor.predict_targets(names, table)
    metrics = _binary(
        np.array([r.aml_label for r in records]),
        probs["aml"],
        args,
        config,
        "aml_",
        f"AML ({split})",
    )
    # each genetic output (P(NPM1 | AML), P(APL | AML)) on the AML cases of known status
    from marrowscope.targets import genetic_target
    from training.ensemble import target_labels, target_report

    for t in [t for t in probs if t != "aml"]:
        found, paths = target_report(
            t,
            target_labels(records, [t])[:, 0],
            probs[t],
            config,
            (args.plots or Path("plots")) if args.plots or args.mlflow else None,
            title=f"{genetic_target(t).name} | AML ({split})",
        )
        metrics.update(found)
        args._plot_paths = [*getattr(args, "_plot_paths", []), *paths]
    return metrics


def main(args: argparse.Namespace) -> dict[str, Any]:
    from marrowscope import registry
    from marrowscope.inference import load_predictor

    if not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist")
    if args.kind != "ensemble" and (args.segmentation or args.celltype):
        raise UsageError("--segmentation/--celltype only apply to the ensemble")
    job = {"detection": "segmentation"}.get(args.kind, args.kind)
    config = JobConfig.of(job, load_job_config(job, args.config))
    resolved = registry.resolve(args.model, tracking_uri=args.tracking_uri)
    predictor = load_predictor(str(resolved.local_dir), device=args.device)
    expected = {"detection": "detector"}.get(args.kind, args.kind)
    if predictor.kind != expected:
        raise UsageError(f"{args.model} is a {predictor.kind} model, not a {expected}")
    split = _split(args)
    if args.kind == "detection":
        metrics = evaluate_detection(predictor, args.data, split, config)
    elif args.kind == "celltype":
        metrics = evaluate_celltype(predictor, args.data, split, config)
    elif args.kind == "npm1":
        metrics = evaluate_npm1(predictor, args, split, config)
    else:
        metrics = evaluate_ensemble(predictor, args, split, config, resolved.lineage())
    result = {
        "kind": args.kind,
        "model": args.model,
        "version": resolved.version,
        "data": str(args.data),
        "split": split,
        **metrics,
    }
    if args.mlflow:
        import mlflow
        from training.evaluate_metrics import log_plots

        mlflow.set_tracking_uri(args.tracking_uri or registry.default_tracking_uri())
        mlflow.set_experiment("marrowscope-evaluate")
        with mlflow.start_run(run_name=f"evaluate-{args.kind}-{resolved.version}"):
            mlflow.log_params(
                {
                    "model": args.model,
                    "version": resolved.version,
                    "data": str(args.data),
                    "split": split,
                }
            )
            mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            )
            log_plots(getattr(args, "_plot_paths", []))
    return result


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if sys.argv[1:2] == ["corrections"]:  # its own flags: no --model / --data
        from training.evaluate_corrections import main as corrections_main

        sys.exit(corrections_main(sys.argv[2:]))
    parser = get_args_parser()
    try:
        out = main(parser.parse_args())
    except UsageError as exc:
        parser.error(str(exc))
    print(json.dumps(out, sort_keys=True))
