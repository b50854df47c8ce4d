"""Shared pieces of the training jobs: flags, configs, seeding, checkpoint/resume, MLflow
runs, data hashing, device/AMP, the epoch loop and the end-of-job registration.

Every job (`python -m training.<job>`) has `get_args_parser()` + `main(args)`; `main`
rejects bad flag combinations before any work (`check_args`), builds a frozen `JobConfig`
from `training/configs/<name>.json` (+ `--set key=value` overrides), logs it to MLflow and
runs `fit` (seeded, resumable from `<output>/checkpoint.pt`, progress via tqdm/logging).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_SUBDIR = "model"


class UsageError(ValueError):
    """A bad flag combination or config value, found before any work starts."""


# ---------------------------------------------------------------- flags and configs


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--data", type=Path, help="dataset folder (COCO folder of docs/CONTRACTS.md, or VOC)"
    )
    p.add_argument(
        "--output", type=Path, help="output folder (model/, checkpoint.pt, metrics.json)"
    )
    p.add_argument(
        "--config",
        default="auto",
        help="cpu-tiny | cpu-demo | paper-gpu | path to a JSON file; auto = paper-gpu "
        "with CUDA, else cpu-demo",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (JSON value), e.g. --set epochs=3",
    )
    p.add_argument("--seed", type=int, default=None, help="training seed (default: config's)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--resume", action="store_true", help=f"continue from <output>/{CHECKPOINT_FILE}"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the embedded store)",
    )
    p.add_argument(
        "--experiment", default=None, help="MLflow experiment (default marrowscope-train-<job>)"
    )
    p.add_argument("--no-register", action="store_true", help="do not register the model version")
    p.add_argument(
        "--promote", action="store_true", help="run the promotion gates after registering"
    )
    p.add_argument(
        "--hpo-trials", type=int, default=None, help="run N Optuna trials instead of one training"
    )
    p.add_argument("--study", default=None, help="Optuna study name (required with --hpo-trials)")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL, e.g. postgresql+psycopg2://user@host/db (shared by workers)",
    )
    p.add_argument("--worker-id", default=None, help="HPO worker id recorded on its trials")
    return p


def check_args(args: argparse.Namespace, *, needs_data: bool = True) -> None:
    """Reject bad flag combinations before anything is loaded (raises UsageError)."""
    if needs_data and args.data is None:
        raise UsageError("--data is required")
    if args.output is None:
        raise UsageError("--output is required")
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    hpo = args.hpo_trials is not None
    if hpo and args.hpo_trials < 1:
        raise UsageError(f"--hpo-trials must be >= 1, got {args.hpo_trials}")
    if hpo and not args.study:
        raise UsageError("--hpo-trials needs --study NAME (workers sharing a study need its name)")
    if not hpo and (args.study or args.storage):
        raise UsageError("--study/--storage only make sense with --hpo-trials")
    if hpo and (args.promote or args.resume):
        raise UsageError("--hpo-trials cannot be combined with --promote or --resume")
    if args.promote and args.no_register:
        raise UsageError("--promote needs a registered version; drop --no-register")
    for item in args.overrides:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not KEY=VALUE")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_job_config(
    job: str, name: str, overrides: Sequence[str] = (), *, cuda: bool = False
) -> dict[str, Any]:
    """The `job` section of a config file, with `--set` overrides applied (dotted keys reach
    into nested objects, e.g. `hpo.pruner=none`). Unknown keys are refused."""
    if name == "auto":
        name = "paper-gpu" if cuda else "cpu-demo"
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UsageError(f"config {name!r} not found (known: {known}, or a .json path)")
    data = json.loads(path.read_text())
    if job not in data:
        raise UsageError(f"config {path} has no section {job!r}")
    config = dict(data.get("common", {}), **data[job])
    config["config_name"] = path.stem
    for item in overrides:
        key, _, value = item.partition("=")
        target = config
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise UsageError(f"--set {key}: {part!r} is not an object in the {job} config")
            target = target[part] = dict(target[part])
        if leaf not in target:
            raise UsageError(
                f"--set {key}: unknown key for {job} (known: {', '.join(sorted(target))})"
            )
        target[leaf] = _parse_value(value)
    return config


@dataclass(frozen=True)
class JobConfig:
    """Frozen view of a job's config; `values` is read-only, `as_dict()` a copy."""

    job: str
    values: MappingProxyType

    @classmethod
    def of(cls, job: str, values: dict[str, Any]) -> JobConfig:
        return cls(job, MappingProxyType(json.loads(json.dumps(values))))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self.values)))

    def flat(self) -> dict[str, str]:
        """Dotted-key params for MLflow."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = json.dumps(value) if not isinstance(value, str) else value

        walk("", self.as_dict())
        return out


def build_job_config(job: str, args: argparse.Namespace) -> JobConfig:
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    values = load_job_config(job, args.config, args.overrides, cuda=cuda)
    if args.seed is not None:
        values["seed"] = args.seed
    if args.epochs is not None:
        values["epochs"] = args.epochs
    return JobConfig.of(job, values)


# ---------------------------------------------------------------- seeding and device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_and_amp(setting: str, amp: bool) -> tuple[torch.device, bool]:
    """(device, use mixed precision): AMP only on CUDA and only when the config asks."""
    from marrowscope.inference import select_device

    device = select_device(setting)
    return device, bool(amp) and device.type == "cuda"


def amp_context(enabled: bool):
    import torch

    from marrowscope.inference import autocast_context

    return (
        autocast_context(torch.device("cuda"), "fp16")
        if enabled
        else autocast_context(torch.device("cpu"), "none")
    )


# ---------------------------------------------------------------- data hashing


def data_hash(data_dir: Path) -> str:
    """sha256 over the files that define a dataset's labels and splits (annotations.json and
    cases.csv, or a VOC folder's XML files and split lists, or an ImageFolder's file list)."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    files = [data_dir / n for n in ("annotations.json", "cases.csv") if (data_dir / n).is_file()]
    if not files and (data_dir / "Annotations").is_dir():
        files = sorted((data_dir / "Annotations").glob("*.xml")) + sorted(
            (data_dir / "ImageSets" / "Main").glob("*.txt")
        )
    if files:
        for f in files:
            h.update(str(f.relative_to(data_dir)).encode() + b"\0")
            h.update(f.read_bytes())
    else:  # single-cell ImageFolder: names and sizes (hashing every pixel is not needed)
        for f in sorted(p for p in data_dir.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(data_dir)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],  # type: ignore[attr-defined]
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    *,
    epoch: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    history: list[dict[str, float]],
    config: dict[str, Any],
) -> None:
    """Everything needed to continue after `epoch` (0-based, completed), written atomically.
    Loaded with `torch.load(weights_only=True)`: tensors and plain containers only."""
    import torch

    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "history": history,
        "config": json.dumps(config, sort_keys=True),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    changed = sorted(
        k for k in set(saved) | set(config) if k != "epochs" and saved.get(k) != config.get(k)
    )
    if changed:
        raise UsageError(f"--resume: config differs from the checkpoint's in {changed}")
    return state


# ---------------------------------------------------------------- the epoch loop


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    seconds: float = 0.0


def fit(
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    epochs: int,
    train_epoch: Callable[[int], float],
    validate: Callable[[int], dict[str, float]] | None,
    output: Path,
    config: dict[str, Any],
    resume: bool = False,
    scaler: Any = None,
    trial: Any = None,
    monitor: str | None = None,
    checkpoint: bool = True,
) -> FitResult:
    """Run epochs `start..epochs-1`: `train_epoch(epoch)` -> mean loss, `validate(epoch)` ->
    metrics (logged to the active MLflow run at step=epoch), scheduler step, checkpoint.

    With `resume`, model/optimizer/scheduler/scaler/RNG states come from the checkpoint, so
    the continued run equals an uninterrupted one. With an Optuna `trial`, `monitor` is
    reported each epoch and `optuna.TrialPruned` raised when the pruner says so.
    """
    import sys

    mlflow = sys.modules.get("mlflow")  # a run can only be active when mlflow was imported
    output.mkdir(parents=True, exist_ok=True)
    ckpt_path = output / CHECKPOINT_FILE
    result = FitResult()
    if resume:
        state = load_checkpoint(ckpt_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        result.history = list(state["history"])
        result.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d", ckpt_path, state["epoch"])
    t0 = time.perf_counter()
    for epoch in range(result.start_epoch, epochs):
        model.train()
        loss = float(train_epoch(epoch))
        row = {"epoch": epoch, "train_loss": loss}
        if validate is not None:
            model.eval()
            row.update(validate(epoch))
        if scheduler is not None:
            scheduler.step()
        result.history.append(row)
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        every = max(1, epochs // 20)
        log.log(
            logging.INFO if (epoch + 1) % every == 0 or epoch + 1 == epochs else logging.DEBUG,
            "epoch %d/%d %s",
            epoch + 1,
            epochs,
            " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        if checkpoint:
            save_checkpoint(
                ckpt_path,
                epoch=epoch,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                history=result.history,
                config=config,
            )
        if trial is not None and monitor is not None and monitor in row:
            import optuna

            trial.report(row[monitor], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({monitor}={row[monitor]:.4g})")
    result.seconds = time.perf_counter() - t0
    return result


def progress(iterable, *, desc: str, total: int | None = None):
    """tqdm progress on stderr when it is a terminal; plain iteration otherwise."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty())


# ---------------------------------------------------------------- MLflow and registration


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


def finish(
    *,
    kind: str,
    args: argparse.Namespace,
    run: Any,
    model_dir: Path,
    metrics: dict[str, float],
    config: JobConfig,
    data_digest: str,
    lineage: dict[str, str] | None = None,
) -> str | None:
    """Log final metrics, write `<output>/metrics.json`, register (unless --no-register) and
    promote (with --promote). Returns the registered version or None."""
    import mlflow
    from marrowscope import registry

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


def run_main(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """CLI wrapper: logging set up, UsageError -> exit 2 with the parser's message."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parser.parse_args()
    try:
        main(args)
    except UsageError as exc:
        parser.error(str(exc))
