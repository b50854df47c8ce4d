"""Train the ensemble net (the paper's ENN): case features -> P(AML), and P(NPM1 | AML).

    python -m training.ensemble --data data/synth --output runs/ensemble --config cpu-demo \
        --segmentation models:/marrowscope-segmentation/3 --celltype models:/marrowscope-celltype/5

Features come from running the *registered* segmentation and celltype versions over every
case (`marrowscope.inference.analyse_case`: the case analysis of `marrowscope.case` that the
gateway runs over its model services, with the predictors in process; tests/e2e/
test_case_parity.py checks both give the same case vector), so the ensemble sees in
training what it will see in production; those versions are recorded as
lineage (`marrowscope.lineage.segmentation|celltype`). Features are cached per
(data hash, upstream versions) in the output folder. Evaluation: case-grouped k-fold CV on
the train+val cases (config `cv_folds`, 3 as in the paper) and the held-out test cases:
`auroc` (+ bootstrap 95 % CI), `pr_auc`, `brier`, `accuracy`, ROC/PR/calibration/confusion
plots. The model config records `feature_units` (um with the training pixel-size range when
the images have `um_per_px`, else px) so that serving can refuse features in another unit.

Config `targets` (`["aml", "npm1"]` in the shipped configs; a config file without the key
trains AML only) adds genetic outputs on the same hidden layers, one per target defined in
`marrowscope.targets` (npm1 = P(NPM1 mutated | AML), apl = P(APL | AML)): the blast
attribute fractions, differential and morphometric summaries in the case vector are the
morphology hematologists read for them, and unlike the whole-image CNN (training/npm1.py)
the heads learn on CPU-sized data. Loss = BCE(AML) + a masked BCE per genetic target: each
term is averaged over the batch's AML cases with a known status for that target only
(`ensemble_loss`; controls and unknown status add nothing to it), the terms summed
unweighted. A target's metrics are the AML names prefixed `<target>_` on the held-out AML
cases with a known status (`npm1_auroc`, ..., `apl_cv_auroc_mean`), its decision threshold
config `<target>_score_threshold` (null = 0.5, like `score_threshold` for AML). The case
label comes from the target's cases.csv column (`npm1_status`: mutated | wild_type;
`apl_status`: apl | non_apl, an extra column). HPO still maximises the AML validation
AUROC; the genetic heads are trained in every trial but do not steer the search.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import JobConfig, UsageError, job_config, job_parser, run_main
from training.common_data import data_hash
from training.engine import AmpStep, epoch_generator, fit, progress, seed_everything
from training.tracking import finish, mlflow_run, tracking_uri

log = logging.getLogger(__name__)
JOB = "ensemble"


def case_feature_table(
    data_dir: Path,
    records: list,
    detector,
    celltyper,
    cache: Path | None = None,
    scale: dict[str, float | None] | None = None,
) -> tuple[tuple[str, ...], np.ndarray]:
    """(feature names, float32[n_cases, F]) in `records` order via `analyse_case`."""
    from marrowscope.features import case_feature_names
    from marrowscope.inference import analyse_case
    from training.common_data import read_rgb

    names = case_feature_names()
    if cache is not None and cache.is_file():
        data = np.load(cache, allow_pickle=False)
        ids = [str(v) for v in data["case_ids"]]
        if ids == [r.case_id for r in records] and tuple(str(v) for v in data["names"]) == names:
            log.info("features from cache %s", cache)
            return names, data["features"]
    scale = pixel_sizes(data_dir) if scale is None else scale
    rows = []
    for r in progress(records, desc="case features"):
        images = [read_rgb(Path(data_dir) / p) for p in r.image_paths]
        analysis = analyse_case(
            images, detector, celltyper, um_per_px=[scale.get(p) for p in r.image_paths]
        )
        rows.append(analysis.features)
    table = np.stack(rows).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            case_ids=np.array([r.case_id for r in records]),
            names=np.array(names),
            features=table,
        )
    return names, table


def pixel_sizes(data_dir: Path) -> dict[str, float | None]:
    """COCO `file_name` -> `um_per_px` (None when absent); {} without annotations.json."""
    from training.data.coco import load_json

    coco = Path(data_dir) / "annotations.json"
    if not coco.is_file():
        return {}
    return {im["file_name"]: im.get("um_per_px") for im in load_json(coco)["images"]}


def training_feature_units(
    data_dir: Path, records: list, scale: dict[str, float | None] | None = None
) -> dict[str, Any]:
    """The `feature_units` of the case features of `records` (all their images); `scale`:
    `pixel_sizes(data_dir)` when the caller already has it.

    Raises UsageError when some images have a pixel size and others not: morphometrics in
    um and px would be mixed in one feature column.
    """
    from marrowscope.models import ModelConfigError, units_from_pixel_sizes

    scale = pixel_sizes(data_dir) if scale is None else scale
    try:
        return units_from_pixel_sizes(scale.get(p) for r in records for p in r.image_paths)
    except ModelConfigError as exc:
        raise UsageError(f"{data_dir}: {exc}") from None


def job_targets(config: JobConfig) -> list[str]:
    """The config's `targets` (absent: `["aml"]`), checked as the model config will check it."""
    from marrowscope.models import ModelConfigError, make_config

    targets = config.get("targets", ["aml"])
    try:
        make_config("ensemble", "mlp", feature_names=["probe"], targets=targets)
    except ModelConfigError as exc:
        raise UsageError(f"config targets: {exc}") from None
    return list(targets)


def _label(record, target: str) -> float:
    from marrowscope.targets import genetic_target

    if target == "aml":
        return float(record.aml_label)
    label = genetic_target(target).label(record)
    return np.nan if label is None else float(label)


def target_labels(records: list, targets: list[str]) -> np.ndarray:
    """float32[N, T] labels in `targets` column order; NaN where a target does not apply:
    a genetic target (`marrowscope.targets`, e.g. npm1, apl) is known for AML cases whose
    label column holds a positive or negative value only (npm1_status mutated / wild_type;
    apl_status apl / non_apl), never for controls (whatever their manifest row says) or an
    unknown status."""
    return np.array([[_label(r, t) for t in targets] for r in records], dtype=np.float32).reshape(
        len(records), len(targets)
    )


def check_target_labels(records: list, targets: list[str], data_dir: Path) -> None:
    """Refuse a genetic target unless the training AML cases hold both of its states:
    without them the head would learn a constant (or nothing) and still be served."""
    from marrowscope.targets import genetic_target

    train = [r for r in records if r.split == "train"]
    for code in targets[1:]:
        t = genetic_target(code)
        y = target_labels(train, [code])[:, 0]
        states = set(y[~np.isnan(y)].astype(int).tolist())
        if len(states) < 2:
            found = (
                f"no AML case with a known {code.upper()} status"
                if not states
                else f"only {(t.positive if 1 in states else t.negative)[0]} {code.upper()}"
            )
            raise UsageError(
                f"{data_dir}: target {code} needs training AML cases of both states "
                f"(cases.csv {t.column} {t.positive[0]} and {t.negative[0]}), "
                f"found {found}; train without it, e.g. --set 'targets=[\"aml\"]'"
            )


def ensemble_loss(logits, labels):
    """Sum over targets of the BCE-with-logits averaged over the rows whose label is known.

    logits FloatTensor[B] or [B, T]; labels FloatTensor of the same shape, NaN = not known
    (the npm1 column of controls and unknown status), such rows add neither loss nor
    gradient. A target with no known row in the batch adds 0. AML labels are always known,
    so a single-target net gets the plain mean BCE.
    """
    import torch.nn.functional as F

    logits, labels = logits.reshape(len(labels), -1), labels.reshape(len(labels), -1)
    total = logits.new_zeros(())
    for t in range(labels.shape[1]):
        known = ~labels[:, t].isnan()
        if known.any():
            total = total + F.binary_cross_entropy_with_logits(logits[known, t], labels[known, t])
    return total


def known_auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC over the rows with a known label (not NaN); None unless both classes occur."""
    from sklearn.metrics import roc_auc_score

    known = ~np.isnan(y)
    if len(np.unique(y[known])) < 2:
        return None
    return float(roc_auc_score(y[known], scores[known]))


def threshold_hyperparameters(config: JobConfig, targets: list[str]) -> dict[str, float]:
    """`{<target>_score_threshold: t}` for every genetic target whose config threshold is set."""
    from marrowscope.targets import genetic_target

    keys = [genetic_target(t).threshold_key for t in targets[1:]]
    return {k: config[k] for k in keys if config.get(k) is not None}


def train_mlp(
    config: JobConfig,
    names: tuple[str, ...],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    output: Path,
    resume: bool = False,
    trial: Any = None,
    checkpoint: bool = True,
    feature_units: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """An `EnsembleNet` fitted with AdamW + `ensemble_loss`; standardisation fitted on `x_train`.

    y_train, y_val: float[N, T] (`target_labels`, T = len(config targets)), or float[N] for
    an AML-only config. `feature_units` (`training_feature_units`) goes into the returned config; None leaves
    the config default ("unknown"), which is fine for models that are never saved (CV, HPO).
    """
    import torch

    from marrowscope.models import build_model, make_config

    targets = job_targets(config)
    y_train = np.asarray(y_train, dtype=np.float32).reshape(len(y_train), -1)
    if y_train.shape[1] != len(targets):
        raise ValueError(f"labels have {y_train.shape[1]} columns for targets {targets}")
    seed_everything(config["seed"])
    model_config = make_config(
        "ensemble",
        "mlp",
        feature_names=list(names),
        hidden=list(config["hidden"]),
        dropout=float(config["dropout"]),
        targets=targets,
        hyperparameters={
            **{k: config[k] for k in ("lr", "weight_decay", "lr_gamma", "epochs", "batch_size")},
            # serving reads each genetic target's decision threshold from here (null:
            # the gateway's setting, e.g. MS_GATEWAY_NPM1_THRESHOLD, applies)
            **threshold_hyperparameters(config, targets),
        },
        training={"seed": config["seed"], "config_name": config["config_name"]},
        **({"feature_units": feature_units} if feature_units is not None else {}),
    )
    model = build_model(model_config)
    model.fit_standardisation(x_train)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)

    step = AmpStep(optimizer, amp=False)

    def train_epoch(epoch: int) -> float:
        order = torch.randperm(len(y), generator=epoch_generator(config["seed"], epoch))
        total, n = 0.0, 0
        for idx in order.split(config["batch_size"]):
            loss = step(ensemble_loss(model(x[idx]), y[idx]))
            total, n = total + loss * len(idx), n + len(idx)
        return total / n

    validate = None
    if x_val is not None:
        y_val = np.asarray(y_val, dtype=np.float32).reshape(len(y_val), -1)
        scored = [
            j for j in range(len(targets)) if len(np.unique(y_val[~np.isnan(y_val[:, j]), j])) == 2
        ]
        if scored:

            def validate(epoch: int) -> dict[str, float]:
                probs = model.predict_targets(x_val)
                return {
                    "val_auroc" if targets[j] == "aml" else f"val_{targets[j]}_auroc": known_auroc(
                        y_val[:, j], probs[targets[j]].numpy()
                    )
                    for j in scored
                }

    fit(
        model=model,
        step=step,
        scheduler=scheduler,
        epochs=config["epochs"],
        train_epoch=train_epoch,
        validate=validate,
        output=output,
        config=config.as_dict(),
        resume=resume,
        trial=trial,
        monitor="val_auroc",
        checkpoint=checkpoint,
    )
    model.eval()
    return model, model_config


def cross_validate(
    config: JobConfig, names, table: np.ndarray, records: list, output: Path
) -> dict[str, float]:
    """Case-grouped k-fold CV (k = config `cv_folds`) on `records`: per-fold AUROC mean/std
    (`cv_auroc_*`), and for each genetic target `<t>_cv_auroc_*` over each fold's AML cases
    of known status. Folds are stratified by the AML label and every genetic target's label
    (control / NPM1-mutated / wild-type AML, ...), so positive cases land in every fold."""
    from training.data.splits import grouped_kfold

    k = config["cv_folds"]
    if not k:
        return {}
    targets = job_targets(config)
    index = {r.case_id: i for i, r in enumerate(records)}
    y = target_labels(records, targets)
    by_case = {r.case_id: row for r, row in zip(records, y, strict=True)}

    def stratify(r) -> str:
        return ":".join("na" if np.isnan(v) else str(int(v)) for v in by_case[r.case_id])

    aurocs: dict[str, list[float]] = {t: [] for t in targets}
    for f, (tr, va) in enumerate(
        grouped_kfold(records, k, seed=config["split_seed"], stratify_by=stratify)
    ):
        ti, vi = [index[c] for c in tr], [index[c] for c in va]
        model, _ = train_mlp(
            config, names, table[ti], y[ti], None, None, output=output / f"cv-{f}", checkpoint=False
        )
        probs = model.predict_targets(table[vi])
        for j, t in enumerate(targets):
            if (auroc := known_auroc(y[vi, j], probs[t].numpy())) is not None:
                aurocs[t].append(auroc)
    log.info(
        "%d-fold grouped CV AUROC: %s", k, {t: [round(a, 4) for a in v] for t, v in aurocs.items()}
    )
    out = (
        {
            "cv_auroc_mean": float(np.mean(aurocs["aml"])),
            "cv_auroc_std": float(np.std(aurocs["aml"])),
            "cv_folds": float(k),
        }
        if aurocs["aml"]
        else {}
    )
    for t in targets[1:]:
        if aurocs.get(t):
            out.update(
                {
                    f"{t}_cv_auroc_mean": float(np.mean(aurocs[t])),
                    f"{t}_cv_auroc_std": float(np.std(aurocs[t])),
                    f"{t}_cv_folds": float(len(aurocs[t])),
                }
            )
    return out


def target_report(
    target: str,
    y: np.ndarray,
    scores: np.ndarray,
    config: JobConfig,
    plots: Path | None,
    title: str | None = None,
) -> tuple[dict[str, float], list[Path]]:
    """`binary_report` (+ `binary_plots` into `plots` unless None) of a genetic target's
    output over the cases with a known status (y NaN elsewhere, `target_labels`), names
    prefixed `<target>_`, threshold config `<target>_score_threshold` (null = 0.5);
    ({}, []) unless both states occur."""
    from marrowscope.targets import genetic_target
    from training.evaluate_metrics import binary_plots, binary_report

    definition = genetic_target(target)
    known = ~np.isnan(y)
    if len(np.unique(y[known])) < 2:
        log.warning(
            "%s metrics left out: the evaluated AML cases hold %s states %s only "
            "(promotion refuses a version without %s_auroc)",
            target,
            target,
            sorted(int(v) for v in np.unique(y[known])),
            target,
        )
        return {}, []
    threshold = config.get(definition.threshold_key)
    threshold = 0.5 if threshold is None else threshold
    report = binary_report(
        y[known], scores[known], threshold=threshold, n_boot=config["n_boot"], seed=config["seed"]
    )
    paths = (
        []
        if plots is None
        else binary_plots(
            y[known],
            scores[known],
            plots,
            prefix=f"{target}_",
            threshold=threshold,
            title=title or f"{definition.name} | AML (test)",
        )
    )
    return {f"{target}_{k}": v for k, v in report.items()}, paths


def get_args_parser() -> argparse.ArgumentParser:
    p = job_parser(JOB, __doc__)
    p.add_argument(
        "--segmentation",
        default="models:/marrowscope-segmentation@champion",
        help="registered segmentation version the features come from (models:/... URI)",
    )
    p.add_argument(
        "--celltype",
        default="models:/marrowscope-celltype@champion",
        help="registered celltype version the features come from (models:/... URI)",
    )
    return p


def _upstream(args: argparse.Namespace):
    from marrowscope.inference import load_predictor

    seg = load_predictor(
        args.segmentation,
        device=args.device if args.device != "auto" else "cpu",
        tracking_uri=tracking_uri(args),
    )
    cel = load_predictor(
        args.celltype,
        device=args.device if args.device != "auto" else "cpu",
        tracking_uri=tracking_uri(args),
    )
    if seg.kind != "detector" or cel.kind != "celltype":
        raise UsageError(
            f"--segmentation must be a detector and --celltype a celltype model, got "
            f"{seg.kind} and {cel.kind}"
        )
    return seg, cel


def _check_upstream_flags(args: argparse.Namespace) -> None:
    if not args.no_register:
        for flag, uri in (("--segmentation", args.segmentation), ("--celltype", args.celltype)):
            if not uri.startswith("models:/"):
                raise UsageError(
                    f"{flag} {uri!r}: lineage needs a registered version (models:/NAME/VERSION "
                    "or @ALIAS); use --no-register to train on a local model directory"
                )


def main(args: argparse.Namespace) -> dict[str, float] | None:
    config = job_config(JOB, args, check=_check_upstream_flags)
    from training.common_data import load_cases

    records = load_cases(args.data, config)
    targets = job_targets(config)
    check_target_labels(records, targets, args.data)  # these before the slow feature pass
    scale = pixel_sizes(args.data)  # annotations.json parsed once for units and features
    units = training_feature_units(args.data, records, scale)
    log.info("morphometric features in %s", units)
    seg, cel = _upstream(args)
    digest = data_hash(args.data)
    lineage = {"segmentation": seg.version, "celltype": cel.version}
    log.info("features from segmentation %s and celltype %s", seg.version, cel.version)
    cache = args.output / f"features-{digest[:12]}-seg{seg.version}-cel{cel.version}.npz"
    names, table = case_feature_table(args.data, records, seg, cel, cache, scale=scale)
    y = target_labels(records, targets)  # [N, T]; column 0 is AML
    split = np.array([r.split for r in records])
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))

    if args.hpo_trials:
        from training.hpo import run_hpo

        def trial_fn(cfg: JobConfig, trial) -> dict[str, float]:
            model, _ = train_mlp(
                cfg,
                names,
                table[tr],
                y[tr],
                table[va],
                y[va],
                output=args.output / f"trial-{trial.number}",
                trial=trial,
                checkpoint=False,
            )
            from sklearn.metrics import roc_auc_score

            # the objective is the AML output's (README: HPO); the NPM1 head trains alongside
            return {"auroc": float(roc_auc_score(y[va, 0], model.predict_proba(table[va]).numpy()))}

        run_hpo(args, config, job=JOB, monitor="auroc", train_trial=trial_fn)
        return None

    from training.evaluate_metrics import binary_plots, binary_report, log_plots

    with mlflow_run(args, JOB, config) as run:
        import mlflow

        mlflow.set_tags({f"marrowscope.lineage.{k}": v for k, v in lineage.items()})
        # CV on train+val only: rows of `table` and records must be the same subset, in order.
        rows = np.concatenate([tr, va])
        cv = cross_validate(config, names, table[rows], [records[i] for i in rows], args.output)
        model, model_config = train_mlp(
            config,
            names,
            table[tr],
            y[tr],
            table[va],
            y[va],
            output=args.output,
            resume=args.resume,
            feature_units=units,
        )
        model_config["training"].update({"data_hash": digest, "lineage": lineage})
        probs = {t: p.numpy() for t, p in model.predict_targets(table[te], list(names)).items()}
        scores = probs["aml"]
        threshold = config["score_threshold"] if config["score_threshold"] is not None else 0.5
        metrics = binary_report(
            y[te, 0], scores, threshold=threshold, n_boot=config["n_boot"], seed=config["seed"]
        )
        metrics.update(cv)
        log_plots(
            binary_plots(
                y[te, 0],
                scores,
                args.output / "plots",
                prefix="aml_",
                threshold=threshold,
                title="AML (test)",
            )
        )
        for j, t in enumerate(targets[1:], start=1):
            target_metrics, target_plots = target_report(
                t, y[te, j], probs[t], config, args.output / "plots"
            )
            metrics.update(target_metrics)
            log_plots(target_plots)
        log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        finish(
            kind=JOB,
            args=args,
            run=run,
            model=model,
            model_config=model_config,
            metrics=metrics,
            config=config,
            data_digest=digest,
            lineage=lineage if not args.no_register else None,
        )
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
