"""Command-line side of the training jobs: the common flags, config files, the frozen
`JobConfig` and the `main` wrapper.

Every job (`python -m training.<job>`) has `get_args_parser()` (built on `job_parser`) and
`main(args)`; `main` opens with `job_config`, which rejects bad flag combinations before any
work and builds a frozen `JobConfig` from `training/configs/<name>.json` (+ `--set
key=value` overrides). The fit loop lives in `training.engine`, MLflow in
`training.tracking`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class UsageError(ValueError):
    """A bad flag combination or config value, found before any work starts."""


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
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
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


def job_parser(job: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m training.<job>` with the common flags; `doc` (the job
    module's docstring) is the help text, kept as written."""
    p = argparse.ArgumentParser(
        prog=f"python -m training.{job}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_common_args(p)


def job_config(
    job: str,
    args: argparse.Namespace,
    *,
    needs_data: bool = True,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> JobConfig:
    """The opening of every job's `main`: the common flag checks, then the job's own
    `check` (both raise UsageError before anything is loaded), then the frozen config."""
    check_args(args, needs_data=needs_data)
    if check is not None:
        check(args)
    return build_job_config(job, args)


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
