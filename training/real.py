"""`make real`: train, register and promote the real-data model set, ready for `make serve`.

    python -m training.real --workdir DIR                 # --budget cpu: the real configs
    python -m training.real --workdir DIR --budget ci     # seconds-long runs (the tests)
    python -m training.serve --workdir DIR                # then serve it (`make serve
                                                          #   SERVE_WORKDIR=DIR`)

From the real sets of `../shared/data` (`--data`; its README says what each holds):

1. the detector on BCCD (`training.segmentation`, VOC train / val; classes WBC, RBC,
   Platelets);
2. the cell typer on DeepAPL + PBC (`training.celltype`, config `real-cpu`: DeepAPL split by
   patient, PBC in train / val), with its domain reference (`domain.json`, the per-case
   domain check's statistics) registered with it;
3. the learned nucleus/cytoplasm split on wbc-seg (`training.nucseg`; it also learns from
   the generator's crowded synthetic cells, so reports name it among `synthetic_stages`);
4. the APL model over the embeddings that typer gives every DeepAPL patient's cells
   (`training.apl --save-mil --register-mil`, registered as `marrowscope-mil`), pinned to
   that typer's version: by default the calibrated logistic regression on each case's mean
   cell embedding, the simplest model that held its AUROC under the generalisation suite's
   shifts (`--served-model mil` of training.apl gives the attention MIL instead);
5. two models that hold nothing real, because the real data cannot train them: every real
   patient has AML (no control cases, so no P(AML)) and none has an NPM1 label. The
   pipeline still calls an ensemble (it checks the lineage of the case features) and a
   whole-image npm1 model, so the set registers an untrained ensemble pinned to the
   detector and typer above and an untrained npm1 model, each declaring its output
   withheld (config `withheld`, `marrowscope.provenance`): reports show P(AML)
   `not_available` (reason `no_aml_model`, with why) and, on fields of view,
   `p_npm1_withheld`; the promotion gates do not score a withheld output.

Every version records what it learned from (`training.trained_on`, tag
`marrowscope.trained_on`) and the result of every case names it (`trained_on`,
`synthetic_stages`). The six versions are promoted together (`training.promote
--pipeline`, all or nothing): the same gates and lineage pins as `make demo` (the ensemble
built on exactly this detector and typer, the MIL model on this typer's embeddings). With
`--budget ci` the floors are 0 and the margin 1 (seconds of training meet no real floor:
the gates still judge lineage and configuration); `--budget cpu` keeps the production
floors, so a set that misses one is refused and says which. `WORKDIR/stack.json` then
tells `python -m training.serve --workdir DIR` how to serve it: that bag model answers
P(APL | AML) (`MS_GATEWAY_APL_MODEL=mil`) and the segmentation service runs the learned
split.

A second run reuses every job whose inputs did not change (`WORKDIR/runs/<job>/
registered.json`); `--retrain` trains everything again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from marrowscope.paths import PROJECT_ROOT, shared_data_dir
from marrowscope.stages import Stage
from training.cli import UsageError

REAL_SETS = {
    Stage.SEGMENTATION: "bccd",
    Stage.CELLTYPE: "deepapl+pbc",
    Stage.NUCSEG: "wbc-seg",
}
NO_AML_MODEL = (
    "no real control (non-AML) cases exist to train P(AML): every patient of the real data has AML"
)
NO_NPM1_MODEL = "no real NPM1 labels exist to train the whole-image P(NPM1)"


def _ci_flags() -> dict[str, list[str]]:
    """Seconds-long runs for the tests: tiny models, a few steps, nested CV of 2 x 2."""
    return {
        # an untrained detector proposes its maximum of boxes everywhere: scoring 87 images
        # with 100 each took 90 s, with 10 a few seconds
        Stage.SEGMENTATION: ["--config", "cpu-tiny", "--set", "box_detections_per_img=10"],
        Stage.CELLTYPE: ["--config", "cpu-tiny", "--set", "max_steps_per_epoch=30"],
        Stage.NUCSEG: ["--config", "cpu-tiny", "--no-cv"],
        Stage.MIL: [
            "--folds",
            "2",
            "--repeats",
            "1",
            "--inner-folds",
            "2",
            "--mil-epochs",
            "2",
            "--morph-cells",
            "4",
            "--instance-dropouts",
            "0.5",
            "--n-boot",
            "50",
            "--shifts",
            "",
            "--config",
            "cpu-tiny",
        ],  # fmt: skip
    }


def _cpu_flags() -> dict[str, list[str]]:
    """The real configs: the detector recipe of `training.results bccd` (CPU profile), the
    `real-cpu` typer, the demo-sized split, and the APL experiment's defaults (its
    stability figure left to `training.apl` itself: serving needs the model only)."""
    from training.results import BCCD_FLAGS

    return {
        Stage.SEGMENTATION: list(BCCD_FLAGS),
        Stage.CELLTYPE: ["--config", "real-cpu"],
        Stage.NUCSEG: ["--config", "cpu-demo"],
        Stage.MIL: ["--shifts", ""],
    }


BUDGETS = {"ci": _ci_flags, "cpu": _cpu_flags}
CI_FLOORS = (
    f"{Stage.SEGMENTATION}.map50=0",
    f"{Stage.CELLTYPE}.macro_f1=0",
    f"{Stage.NUCSEG}.cell_dice=0",
    f"{Stage.NUCSEG}.nc_abs_err=1",
    f"{Stage.MIL}.apl_auroc=0",
)


class PromotionRefused(RuntimeError):
    """The promotion gates refused the trained set (nothing was promoted)."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.real",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=PROJECT_ROOT / ".real",
        help="MLflow store, job outputs and the serving settings (reused by later runs)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the folder holding bccd/, deepapl/, pbc/ and wbc-seg/ (default ../shared/data)",
    )
    p.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        default="cpu",
        help="cpu: the real configs (tens of minutes to hours on a CPU); ci: seconds-long "
        "runs with floors at 0, for tests",
    )
    p.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="[KIND.]METRIC=VALUE",
        help="promotion floor, passed to training.promote (adds to the budget's)",
    )
    p.add_argument("--retrain", action="store_true", help="train every job again")
    return p


def say(message: str) -> None:
    print(f"[real {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: list[str], env: dict[str, str]) -> None:
    say("$ " + " ".join(c if c else "''" for c in cmd))
    subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, check=True)


def _job(
    workdir: Path,
    name: str,
    cmd: list[str],
    env: dict[str, str],
    *,
    tracking_uri: str,
    kind: str,
    retrain: bool,
) -> str:
    """Run one training command and return the version it registered, or the version an
    earlier run registered with the same command (its `registered.json`)."""
    from training.demo import latest_version

    marker = workdir / "runs" / name / "registered.json"
    if not retrain and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("command") == cmd:
            say(f"reusing {name}: {kind} version {done['version']} (trained by an earlier run)")
            return str(done["version"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd, env)
    version = latest_version(tracking_uri, kind)
    marker.write_text(json.dumps({"command": cmd, "version": version}))
    return version


def register_withheld(
    kind: str, directory: Path, *, tracking_uri: str, lineage: dict[str, str]
) -> str:
    """Register an untrained model of `kind` (ensemble or npm1) whose config withholds its
    output, with its reason (module docstring, step 5); return its version. Its weights
    are zeros, so whatever it computes is a constant (P = 0.5), and nothing reads it."""
    import torch

    from marrowscope.features import case_feature_names
    from marrowscope.models import build_model, make_config, save_model
    from marrowscope.provenance import UNTRAINED
    from marrowscope.registry import register_model_dir

    training = {"trained_on": UNTRAINED, "data_hash": "none"}
    if kind == Stage.ENSEMBLE:
        config = make_config(
            "ensemble",
            "mlp",
            feature_names=list(case_feature_names()),
            hidden=[4],
            targets=["aml"],
            withheld={"aml": NO_AML_MODEL},
            training={**training, "lineage": lineage},
        )
    else:
        # the smallest input the npm1 net takes; its answer is withheld anyway
        config = make_config(
            "npm1", "resnet18", input_size=[64, 64], withheld={"npm1": NO_NPM1_MODEL},
            training=training,
        )  # fmt: skip
    module = build_model(config)
    with torch.no_grad():  # parameters only: buffers such as feature_std stay as built
        for parameter in module.parameters():
            parameter.zero_()
    save_model(module, config, directory)
    return register_model_dir(
        kind,
        directory,
        metrics={},
        params={"withheld": next(iter(config["withheld"]))},
        data_hash="none",
        lineage=lineage,
        tracking_uri=tracking_uri,
    )


def serving_env(workdir: Path) -> dict[str, str]:
    """The stack settings `training.serve` starts the real set with."""
    return {
        "MS_GATEWAY_DATA_DIR": str(workdir / "gateway"),
        "MS_GATEWAY_APL_MODEL": "mil",
        "MS_ENSEMBLE_MIL_MODEL_URI": f"models:/{Stage.MIL.registered_name}@champion",
        "MS_SEGMENTATION_SPLITTER_URI": f"models:/{Stage.NUCSEG.registered_name}@champion",
        # a local stack serves plain HTTP on loopback: a Secure cookie would never come back
        "MS_GATEWAY_REVIEW_COOKIE_SECURE": "false",
    }


def check_data(data: Path) -> None:
    missing = [s for s in ("bccd", "deepapl", "pbc", "wbc-seg") if not (data / s).is_dir()]
    if missing:
        raise UsageError(
            f"{data} lacks {', '.join(missing)}: the real sets of ../shared/data/README.md"
        )


def main(args: argparse.Namespace) -> dict[str, str]:
    """Train, register and promote; return the promoted versions (kind -> version)."""
    from training.demo import write_stack_settings

    data = (args.data or shared_data_dir()).resolve()
    check_data(data)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(PROJECT_ROOT))
    flags = BUDGETS[args.budget]()
    started = time.monotonic()
    runs = workdir / "runs"

    def job(kind: Stage, module: str, data_flag: list[str], extra: tuple[str, ...] = ()) -> str:
        cmd = [
            sys.executable, "-m", module, *data_flag, "--tracking-uri", tracking_uri,
            *flags[kind], *extra,
        ]  # fmt: skip
        return _job(
            workdir, kind, cmd, env, tracking_uri=tracking_uri, kind=kind, retrain=args.retrain
        )

    out = ["--output"]
    versions: dict[str, str] = {}
    versions[Stage.SEGMENTATION] = job(
        Stage.SEGMENTATION,
        "training.segmentation",
        ["--data", str(data / "bccd"), *out, str(runs / "segmentation")],
    )
    versions[Stage.CELLTYPE] = job(
        Stage.CELLTYPE, "training.celltype", ["--data", str(data), *out, str(runs / "celltype")]
    )
    versions[Stage.NUCSEG] = job(
        Stage.NUCSEG,
        "training.nucseg",
        ["--data", str(data / "wbc-seg"), *out, str(runs / "nucseg")],
    )
    versions[Stage.MIL] = job(
        Stage.MIL,
        "training.apl",
        ["--data", str(data / "deepapl"), "--workdir", str(runs / "mil")],
        (
            "--celltype-model",
            f"models:/{Stage.CELLTYPE.registered_name}/{versions[Stage.CELLTYPE]}",
            "--save-mil",
            str(runs / "mil" / "model"),
            "--register-mil",
            "--results",
            str(runs / "mil" / "results"),
        ),  # fmt: skip
    )
    lineage: dict[str, str] = {s: versions[s] for s in (Stage.SEGMENTATION, Stage.CELLTYPE)}
    versions[Stage.ENSEMBLE] = register_withheld(
        Stage.ENSEMBLE, runs / "ensemble" / "model", tracking_uri=tracking_uri, lineage=lineage
    )
    versions[Stage.NPM1] = register_withheld(
        Stage.NPM1, runs / "npm1" / "model", tracking_uri=tracking_uri, lineage={}
    )
    floors = [*(CI_FLOORS if args.budget == "ci" else ()), *args.floor]
    promote = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.promote",
            "--tracking-uri",
            tracking_uri,
            "--pipeline",
            *[f"{k}={v}" for k, v in versions.items()],
            *[flag for floor in floors for flag in ("--floor", floor)],
            *(["--margin", "1"] if args.budget == "ci" else []),
        ],  # fmt: skip
        env=env,
        cwd=PROJECT_ROOT,
    )
    if promote.returncode != 0:
        raise PromotionRefused(
            f"training.promote refused the set {versions} (exit {promote.returncode}; its "
            "table above names the failed gate); the versions stay registered"
        )
    write_stack_settings(workdir, tracking_uri, serving_env(workdir))
    say(
        f"promoted {versions} in {time.monotonic() - started:.0f} s; serve them with "
        f"`python -m training.serve --workdir {args.workdir}`"
    )
    return versions


if __name__ == "__main__":
    from training.cli import run_main

    try:
        run_main(main, get_args_parser())
    except PromotionRefused as exc:
        say(str(exc))
        sys.exit(1)
