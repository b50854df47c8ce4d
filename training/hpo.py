"""Optuna hyper-parameter search shared by the training jobs (`--hpo-trials N --study NAME
--storage URL`).

Search spaces follow the paper: NPM1 ResNet: learning rate, learning-rate gamma, momentum,
weight decay; the classifiers (celltype, ensemble) add dropout; the detector: learning
rate, momentum, weight decay. Each trial trains on the training cases and is scored on the
validation cases (`monitor` metric, maximised), reported every epoch so the pruner
(median by default, config `hpo.pruner`) can stop weak trials early.

Workers started anywhere with the same `--study` and `--storage` (PostgreSQL:
`postgresql+psycopg2://user@host/db`) share one study: Optuna's RDB storage hands out
trials, the TPE sampler of each worker is seeded differently so they do not repeat each
other. Each trial records `worker` (`--worker-id`, else host:pid) as a user attribute and
is a nested MLflow run under the worker's parent run (optuna-integration's MLflowCallback
with `track_in_mlflow`, so per-epoch metrics land in the trial's run). HPO runs register
nothing: retrain with the best values (`--set lr=...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from training.cli import JobConfig, UsageError
from training.tracking import mlflow_run, tracking_uri

log = logging.getLogger(__name__)

SearchSpace = Callable[[Any], dict[str, Any]]


def _npm1(trial) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "lr_gamma": trial.suggest_float("lr_gamma", 0.5, 0.99),
        "momentum": trial.suggest_float("momentum", 0.5, 0.99),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


def _classifier(trial) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
    }


def _detector(trial) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1e-3, 5e-2, log=True),
        "momentum": trial.suggest_float("momentum", 0.8, 0.99),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
    }


SEARCH_SPACES: dict[str, SearchSpace] = {
    "npm1": _npm1,
    "celltype": _classifier,
    "ensemble": _classifier,
    "segmentation": _detector,
}


def make_pruner(settings: dict[str, Any]):
    """`median` (MedianPruner), `threshold` (prune below `lower`), or `none`."""
    import optuna

    kind = settings.get("pruner", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.get("n_startup_trials", 5),
            n_warmup_steps=settings.get("n_warmup_steps", 0),
        )
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=settings["lower"], n_warmup_steps=settings.get("n_warmup_steps", 0)
        )
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"hpo.pruner must be median, threshold or none, got {kind!r}")


def _create_study(name: str, storage: str, pruner, sampler):
    """Create or join the study. Workers starting together race to create Optuna's tables
    and the study row; the loser's error is transient, so retry a few times."""
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=name,
                storage=storage,
                direction="maximize",
                pruner=pruner,
                sampler=sampler,
                load_if_exists=True,
            )
        except (
            IntegrityError,
            OperationalError,
            ProgrammingError,
            optuna.exceptions.DuplicatedStudyError,
        ) as exc:
            if attempt == 4:
                raise
            log.warning("joining study %s failed (%s); retrying", name, type(exc).__name__)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def worker_id(args: argparse.Namespace) -> str:
    return args.worker_id or f"{socket.gethostname()}:{os.getpid()}"


def run_hpo(
    args: argparse.Namespace,
    config: JobConfig,
    *,
    job: str,
    monitor: str,
    train_trial: Callable[[JobConfig, Any], dict[str, float]],
) -> Any:
    """Run `args.hpo_trials` trials of `train_trial(config_with_trial_values, trial)` (which
    returns validation metrics and reports `monitor` each epoch) in the shared study."""
    import optuna
    from optuna_integration.mlflow import MLflowCallback

    import mlflow

    if job not in SEARCH_SPACES:
        raise UsageError(f"no search space for {job}")
    storage = args.storage
    if storage is None:
        storage = f"sqlite:///{(args.output / 'optuna.db').resolve()}"
        log.info("no --storage: study kept in %s (one worker only)", storage)
    me = worker_id(args)
    sampler = optuna.samplers.TPESampler(
        seed=(config["seed"] * 1000003 + os.getpid()) % 2**31, n_startup_trials=3
    )
    study = _create_study(args.study, storage, make_pruner(config.get("hpo", {})), sampler)
    study.set_user_attr(f"monitor_{job}", monitor)
    space = SEARCH_SPACES[job]
    base = config.as_dict()

    with mlflow_run(args, job, config, run_name=f"hpo-{args.study}-{me}") as parent:
        mlflow.set_tags({"marrowscope.hpo.study": args.study, "marrowscope.hpo.worker": me})
        callback = MLflowCallback(
            tracking_uri=tracking_uri(args),
            metric_name=f"val_{monitor}",
            create_experiment=False,
            mlflow_kwargs={"nested": True, "experiment_id": parent.info.experiment_id},
        )

        @callback.track_in_mlflow()
        def objective(trial) -> float:
            trial.set_user_attr("worker", me)
            values = dict(base, **space(trial))
            metrics = train_trial(JobConfig.of(job, values), trial)
            if monitor not in metrics:
                raise RuntimeError(f"trial returned no {monitor!r} (got {sorted(metrics)})")
            return float(metrics[monitor])

        study.optimize(
            objective, n_trials=args.hpo_trials, callbacks=[callback], catch=(), gc_after_trial=True
        )
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    log.info("study %s: %s", args.study, {k: v for k, v in states.items() if v})
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        log.info(
            "best trial %d (%s=%.4g, worker %s): %s",
            best.number,
            monitor,
            best.value,
            best.user_attrs.get("worker"),
            best.params,
        )
    return study
