"""MLflow side of the training jobs: the run a job trains in, per-epoch metrics, and the
end-of-job metrics, registration and promotion.

`mlflow_run` opens the run in `--experiment` (default `marrowscope-train-<job>`) with the
config logged; `training.engine.fit` logs each epoch's row through `log_epoch`; `finish`
saves `<output>/model/` (`MODEL_SUBDIR`), writes `<output>/metrics.json` and registers the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.cli import JobConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
"""Where a job saves the model it registers, under `--output`."""


def tracking_uri(args: argparse.Namespace) -> str:
    from marrowscope.registry import default_tracking_uri

    return args.tracking_uri or default_tracking_uri()


@contextmanager
def mlflow_run(
    args: argparse.Namespace, job: str, config: JobConfig, *, run_name: str | None = None
) -> Iterator[Any]:
    """An active MLflow run in `--experiment` (default `marrowscope-train-<job>`) with the
    config logged as params and as `config.json`."""
    import mlflow
    from marrowscope.registry import local_artifact_location

    uri = tracking_uri(args)
    mlflow.set_tracking_uri(uri)
    name = args.experiment or f"marrowscope-train-{job}"
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=local_artifact_location(uri))
        except mlflow.exceptions.MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # not a concurrent creation
                raise
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name=run_name or f"{job}-{config['config_name']}") as run:
        mlflow.log_params({k: v[:6000] for k, v in config.flat().items()})
        mlflow.log_dict(config.as_dict(), "config.json")
        yield run


def log_epoch(row: dict[str, float], epoch: int) -> None:
    """An epoch's metrics (all of `row` but `epoch`) at step=epoch in the active run; a no-op
    outside one (CV folds and tests train without a run)."""
    mlflow = sys.modules.get("mlflow")  # a run can only be active when mlflow was imported
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)


def finish(
    *,
    kind: str,
    args: argparse.Namespace,
    run: Any,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    metrics: dict[str, float],
    config: JobConfig,
    data_digest: str | None = None,
    lineage: dict[str, str] | None = None,
    extra_files: Sequence[Path] = (),
) -> str | None:
    """Save the model to `<output>/model/` (safetensors + config.json; its config's
    `training.trained_on` set from `--data` unless the job recorded it), log final metrics,
    write `<output>/metrics.json`, register (unless --no-register) with `data_digest`
    (default: the model config's `training.data_hash`) and promote (with --promote).
    `extra_files` are copied into the model directory first, so they are registered with
    the version. Returns the registered version or None."""
    import mlflow
    from marrowscope import registry
    from marrowscope.models import save_model
    from training.common_data import trained_on

    # what the weights learned from travels with them (marrowscope.provenance)
    model_config.setdefault("training", {}).setdefault(
        "trained_on", trained_on(getattr(args, "data", None))
    )
    model_dir = save_model(model, model_config, args.output / MODEL_SUBDIR)
    for path in extra_files:  # files that belong to the version (the typer's domain.json)
        shutil.copyfile(path, model_dir / Path(path).name)
    if data_digest is None:
        data_digest = model_config["training"]["data_hash"]
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if args.no_register:
        mlflow.log_artifacts(str(model_dir), registry.ARTIFACT_PATH)
        return None
    version = registry.register_model_dir(
        kind,
        model_dir,
        metrics=metrics,
        params=config.flat(),
        data_hash=data_digest,
        lineage=lineage or {},
        run_id=run.info.run_id,
        tracking_uri=tracking_uri(args),
    )
    mlflow.set_tag("marrowscope.registered_version", version)
    log.info("registered %s version %s", registry.registered_name(kind), version)
    if args.promote:
        from training.promote import promote

        ok, decisions = promote({kind: version}, tracking_uri=tracking_uri(args))
        for d in decisions:
            log.info(
                "promotion gate %s %s v%s: %s (%s)",
                d.gate,
                d.kind,
                d.version,
                "pass" if d.passed else "FAIL",
                d.detail,
            )
        if not ok:
            log.warning("%s v%s was registered but not promoted (a gate failed)", kind, version)
    return version
