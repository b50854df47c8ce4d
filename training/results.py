"""Produce the README figures into bench/results/ (JSON + Markdown), CPU-feasible settings.

    python -m training.results bccd --workdir /tmp/ms_results       # (a) real data
    python -m training.results synthetic --workdir /tmp/ms_results  # (b) synthetic cohort
    python -m training.results real --workdir /tmp/ms_results       # (c) real leukemic cells
    python -m training.results shift --workdir /tmp/ms_results      # (d) generalisation suite

(a) trains the detector on ../shared/data/bccd (train split) and reports per-class AP@0.5
and mAP@0.5 on its val split. (b) generates a synthetic cohort (>= 300 cases, 640x480),
splits it by patient, trains segmentation -> celltype -> ensemble (on features of the
registered upstream versions, with its NPM1-by-morphology output) and the whole-image npm1
CNN, and reports detection mAP@0.5, celltype macro-F1, AML AUROC and both NPM1 AUROCs with
bootstrap 95 % CIs on the held-out test cases. Figures from
(b) are SYNTHETIC: functional evidence only. (c) runs the cross-source comparison of stain
augmentation / normalisation (one source trained on, the other tested), then trains the
cell typer on ../shared/data (DeepAPL + PBC, `real-cpu` config with the comparison's best
stain option, or `--profile gpu` for paper-gpu) and reports on DeepAPL's held-out patients
(`real_cells.md`, see `real`). (d) tests trained typers (`--typer`, default the main run
of (c)) on held-out patients, PBC and wbc-seg under the controlled shifts of
`training.shifts` (`shift.md`, see `training.evaluate_shift`). Every job runs in-process through its
`main(args)` with the exact flags written into the Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from marrowscope.paths import PROJECT_ROOT, shared_data_dir

log = logging.getLogger(__name__)
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"

BCCD_FLAGS = [
    "--config",
    "cpu-demo",
    "--set",
    "min_size=480",
    "--set",
    "max_size=640",
    "--set",
    "epochs=5",
    "--set",
    "lr=0.02",
    "--set",
    "lr_gamma=0.7",
    "--set",
    "warmup_steps=100",
    "--set",
    "max_eval_images=0",
    "--set",
    "box_detections_per_img=300",
]
# The GPU profile is what produced bench/results/bccd_detector_gpu.json (one H200, AMP):
# from-scratch MobileNetV3-FPN, upscaled to 600x800 so platelets meet the smallest anchors.
BCCD_GPU_FLAGS = [
    "--config",
    "cpu-demo",
    "--device",
    "cuda",
    "--set",
    "min_size=600",
    "--set",
    "max_size=800",
    "--set",
    "batch_size=8",
    "--set",
    "lr=0.04",
    "--set",
    "lr_gamma=0.97",
    "--set",
    "warmup_steps=150",
    "--set",
    "epochs=70",
    "--set",
    "max_eval_images=0",
    "--set",
    "box_detections_per_img=300",
    "--set",
    "num_workers=6",
]
SYNTH = {"cases": 300, "size": "640x480", "seed": 2022}
SYNTH_FLAGS: dict[str, list[str]] = {
    # cpu-demo's 480x640 with 16-64 px anchors (map50 0.85 after ~200 steps on the demo
    # cohort); downscaling to 360x480 with the default anchors had failed (map50 0.1).
    "segmentation": [
        "--config",
        "cpu-demo",
        "--set",
        "epochs=1",
        "--set",
        "max_steps_per_epoch=250",
    ],
    "celltype": ["--config", "cpu-demo", "--set", "epochs=6"],
    "ensemble": ["--config", "cpu-demo"],
    "npm1": ["--config", "cpu-demo", "--set", "input_size=[144,192]", "--set", "epochs=6"],
}


def _run(module: str, flags: list[str], *, reuse: bool = False) -> dict[str, Any]:
    """Run `training.<module>` in-process; the result is kept in `<--output>/result.json`.

    With `reuse`, a stage whose result.json records exactly this command and config section
    is not rerun (the ensemble's command names its upstream versions; its
    registered model version is still the newest one: stages run in order)."""
    import importlib

    from training.cli import load_job_config

    command = f"python -m training.{module} " + shlex.join(flags)
    # the same command with an edited config section is a different run
    name = flags[flags.index("--config") + 1] if "--config" in flags else "auto"
    section = json.dumps(load_job_config(module, name), sort_keys=True).encode()
    config_sha = hashlib.sha256(section).hexdigest()
    saved = (
        Path(flags[flags.index("--output") + 1]) / "result.json" if "--output" in flags else None
    )
    if reuse and saved is not None and saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("command") == command and previous.get("config_sha256") == config_sha:
            log.info("%s: reusing %s", module, saved)
            return previous
    mod = importlib.import_module(f"training.{module}")
    args = mod.get_args_parser().parse_args(flags)
    t0 = time.perf_counter()
    metrics = mod.main(args)
    seconds = time.perf_counter() - t0
    log.info("%s finished in %.0f s: %s", module, seconds, metrics)
    result = {
        "command": command,
        "metrics": metrics,
        "seconds": round(seconds, 1),
        "config_sha256": config_sha,
    }
    if saved is not None:
        saved.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _write(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    log.info("wrote %s/%s.{json,md}", RESULTS_DIR, name)


def _machine() -> str:
    import os
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}"
    )


def bccd(workdir: Path, tracking: str, profile: str = "cpu") -> dict[str, Any]:
    data = shared_data_dir() / "bccd"
    if not data.is_dir():
        raise SystemExit(f"{data} is absent (see ../shared/data/README.md)")
    flags = [
        "--data",
        str(data),
        "--output",
        str(workdir / "bccd"),
        "--tracking-uri",
        tracking,
        *(BCCD_GPU_FLAGS if profile == "gpu" else BCCD_FLAGS),
    ]
    res = _run("segmentation", flags)
    m = res["metrics"]
    rows = "\n".join(
        f"| {k.removeprefix('ap50_')} | {v:.3f} |"
        for k, v in sorted(m.items())
        if k.startswith("ap50_")
    )
    md = (
        f"# Detector on BCCD (real data)\n\nTrained on the BCCD `train` split (205 images), evaluated "
        f"on its `val` split (87 images), pycocotools AP@0.5. Machine: {_machine()}; "
        f"{res['seconds']:.0f} s.\n\n```\n{res['command']}\n```\n\n| class | AP@0.5 |\n|---|---|\n"
        f"{rows}\n| **mAP@0.5** | **{m['map50']:.3f}** |\n"
    )
    payload = {"bccd": res, "machine": _machine()}
    _write("bccd_detector" if profile == "cpu" else "bccd_detector_gpu", payload, md)
    return payload


def synthetic(workdir: Path, tracking: str, cases: int, reuse: bool = False) -> dict[str, Any]:
    from training.data.synth import generate_dataset
    from training.data.synth_cohort import SynthConfig

    data = workdir / "synth"
    if not (data / "annotations.json").is_file():
        w, h = (int(v) for v in SYNTH["size"].split("x"))
        summary = generate_dataset(
            data, cases=cases, seed=SYNTH["seed"], config=SynthConfig(size=(w, h))
        )
        log.info("%s", summary.format())
    common = ["--data", str(data), "--tracking-uri", tracking]
    out: dict[str, Any] = {
        "dataset": {"cases": cases, **{k: v for k, v in SYNTH.items() if k != "cases"}}
    }
    versions: dict[str, str] = {}
    from marrowscope import registry

    for job in ("segmentation", "celltype"):
        out[job] = _run(
            job, [*common, "--output", str(workdir / job), *SYNTH_FLAGS[job]], reuse=reuse
        )
        client = registry.get_client(tracking)
        versions[job] = str(
            max(
                int(v.version)
                for v in client.search_model_versions(f"name='{registry.registered_name(job)}'")
            )
        )
    out["ensemble"] = _run(
        "ensemble",
        [
            *common,
            "--output",
            str(workdir / "ensemble"),
            "--segmentation",
            f"models:/marrowscope-segmentation/{versions['segmentation']}",
            "--celltype",
            f"models:/marrowscope-celltype/{versions['celltype']}",
            *SYNTH_FLAGS["ensemble"],
        ],
        reuse=reuse,
    )
    out["npm1"] = _run(
        "npm1", [*common, "--output", str(workdir / "npm1"), *SYNTH_FLAGS["npm1"]], reuse=reuse
    )
    out["machine"] = _machine()

    def ci(m: dict, key: str) -> str:
        return f"{m[key]:.3f} (95 % CI {m[key + '_ci_low']:.3f}-{m[key + '_ci_high']:.3f})"

    seg, cel, ens, npm = (
        out[k]["metrics"] for k in ("segmentation", "celltype", "ensemble", "npm1")
    )
    md = (
        f"# Synthetic cohort (SYNTHETIC data: functional evidence only)\n\n{cases} generated cases at "
        f"{SYNTH['size']} (seed {SYNTH['seed']}), split by patient (held-out test cases never seen "
        f"by any stage). Machine: {out['machine']}.\n\n"
        f"| figure | value (synthetic) | paper (real data) |\n|---|---|---|\n"
        f"| detection mAP@0.5 (cell, RBC) | {seg['map50']:.3f} | 0.97 |\n"
        f"| celltype macro-F1 | {cel['macro_f1']:.3f} | - |\n"
        f"| cup-like nucleus AUROC among true blasts (cell level) | "
        f"{cel.get('auroc_cup_like_nucleus', float('nan')):.3f} | - |\n"
        f"| AML AUROC (ensemble) | {ci(ens, 'auroc')} | 0.9699 |\n"
        f"| NPM1 AUROC, morphology head of the ensemble (AML test cases) | {ci(ens, 'npm1_auroc')} | 0.92 |\n"
        f"| NPM1 AUROC, whole-image ResNet18 at 144x192 (paper's method, CPU-scaled) | {ci(npm, 'auroc')} "
        f"| 0.92 |\n\n"
        "The NPM1 call that beats the paper's floor comes from the ensemble's second output, "
        "P(NPM1 | AML) over the case features (blast cup-like nuclei, nucleoli, chromatin from "
        "the celltype stage). The whole-image CNN is the paper's method; at a CPU-feasible "
        "input size a blast nucleus is ~10 px and the network does not learn the signal "
        "(training/README.md). Commands (in order):\n\n```\n"
        + "\n".join(out[k]["command"] for k in ("segmentation", "celltype", "ensemble", "npm1"))
        + "\n```\n"
    )
    _write("synthetic_cohort", out, md)
    return out


# Cross-source runs (stain robustness, measured): train on one source, test on the other's
# shared classes; shorter than the main run so the comparison fits the CPU budget.
# The stain-robustness comparison: colour augmentation in training (`stain_aug`), colour
# normalisation inside the model (`stain_norm`), both, or neither.
REAL_STAIN_OPTIONS: dict[str, tuple[str, str]] = {
    "none": ("none", "none"),
    "aug": ("both", "none"),
    "norm": ("none", "background"),
    "aug+norm": ("both", "background"),
}
REAL_XS_FLAGS = ["--set", "epochs=6", "--set", "max_steps_per_epoch=40"]
REAL_MIN_TEST_CELLS = 50
REAL_N_BOOT = 1000
REAL_SPLIT_SEEDS = (1, 2)
"""Other patient splits (`split_seed`) of the main CPU run, same recipe and stain option:
how much the held-out figures depend on which patients happen to be held out (the bar is
read on split 0; a figure that only one split reaches does not generalise)."""


def _real_flags(profile: str, workdir: Path) -> list[str]:
    if profile == "gpu":  # paper-gpu's xception41 at 128 px; decodes without a cache
        return [
            "--config",
            "paper-gpu",
            "--device",
            "cuda",
            "--set",
            f"mix_synthetic={workdir / 'synth-attributes'}",
        ]
    return [
        "--config",
        "real-cpu",
        "--set",
        f"crop_cache={workdir / 'crop-cache'}",
        "--set",
        f"mix_synthetic={workdir / 'synth-attributes'}",
    ]


def _xs_flags(
    common: list[str], base: list[str], workdir: Path, src: str, option: str
) -> list[str]:
    """Flags of the cross-source run trained on `src` only with stain option `option`."""
    aug, norm = REAL_STAIN_OPTIONS[option]
    return [
        *common,
        "--output",
        str(workdir / f"xs-{src}-{option}"),
        *base[:2],
        "--set",
        base[3],
        "--set",
        f'real_train_sources=["{src}"]',
        "--set",
        f"stain_aug={aug}",
        "--set",
        f"stain_norm={norm}",
        *REAL_XS_FLAGS,
    ]


def real_cells(
    workdir: Path, tracking: str, profile: str = "cpu", reuse: bool = False, strict: bool = False
) -> dict[str, Any]:
    """Main typer run (DeepAPL + PBC), cross-source runs, then `real_cells.{md,json}`.
    `strict`: every typer run stops on a class folder the taxonomy lacks."""
    data = shared_data_dir()
    if not (data / "deepapl" / "cells.csv").is_file() or not (data / "pbc" / "cells.csv").is_file():
        raise SystemExit(f"{data}/deepapl or pbc is absent (see ../shared/data/README.md)")
    common = ["--data", str(data), "--tracking-uri", tracking, "--no-register"]
    common += ["--strict"] if strict else []
    base = _real_flags(profile, workdir)
    runs: dict[str, dict[str, Any]] = {}
    stain: list[str] = []
    if profile == "cpu":  # the comparison first: its winner is the main run's stain setting
        for option in REAL_STAIN_OPTIONS:
            for src in ("deepapl", "pbc"):
                runs[f"xs_{src}_{option}"] = _run(
                    "celltype", _xs_flags(common, base, workdir, src, option), reuse=reuse
                )
        best = best_stain_option(
            {k: _cross_source(v) for k, v in runs.items() if k.startswith("xs_")}
        )
        aug, norm = REAL_STAIN_OPTIONS[best]
        stain = ["--set", f"stain_aug={aug}", "--set", f"stain_norm={norm}"]
        log.info("stain option %s (best mean cross-source macro-F1): %s", best, " ".join(stain))
    runs["main"] = _run(
        "celltype",
        [*common, "--output", str(workdir / f"real-{profile}"), *base, *stain],
        reuse=reuse,
    )
    for seed in REAL_SPLIT_SEEDS if profile == "cpu" else ():
        runs[f"split_{seed}"] = _run(
            "celltype",
            [
                *common,
                "--output",
                str(workdir / f"real-{profile}-split{seed}"),
                *base,
                *stain,
                "--set",
                f"split_seed={seed}",
            ],
            reuse=reuse,
        )
    return write_real_report(workdir, runs, profile)


def _placeholder(text: str, workdir: Path) -> str:
    """Commands as committed: the work dir as DIR, the shared data as ../shared/data."""
    text = text.replace(str(shared_data_dir()), "../shared/data")
    text = text.replace(str(workdir.resolve()), "DIR").replace(str(workdir), "DIR")
    return text.replace(str(PROJECT_ROOT), ".")


def _output_of(run: dict[str, Any]) -> Path:
    """The `--output` folder of a run's recorded command."""
    return Path(run["command"].split("--output ")[1].split()[0])


def _cross_source(run: dict[str, Any]) -> dict[str, Any]:
    from training.evaluate_real import cross_source

    return cross_source(_output_of(run) / "predictions.npz", min_cells=REAL_MIN_TEST_CELLS)


def best_stain_option(xs: dict[str, dict[str, Any]]) -> str:
    """The option (`xs_<source>_<option>` keys) with the highest cross-source macro-F1
    averaged over both directions; ties go to the earlier option of REAL_STAIN_OPTIONS."""
    import numpy as np

    by_option: dict[str, list[float]] = {}
    for key, r in xs.items():
        by_option.setdefault(key.split("_", 2)[2], []).append(r["external"]["macro_f1"])
    means = {o: float(np.mean(v)) for o, v in by_option.items() if not np.isnan(np.mean(v))}
    if not means:
        raise SystemExit("the cross-source runs gave no figure to choose a stain option by")
    order = list(REAL_STAIN_OPTIONS)
    return max(means, key=lambda o: (means[o], -order.index(o) if o in order else 0))


def write_real_report(workdir: Path, runs: dict[str, dict[str, Any]], profile: str) -> dict:
    """Figures from the runs' predictions.npz files (see `training.evaluate_real`), and what
    the importers read (unknown class folders included)."""
    from training.common_data import real_import_reports
    from training.data.singlecell import import_markdown
    from training.evaluate_real import real_report

    def report(run: dict[str, Any]) -> dict[str, Any]:
        return real_report(
            _output_of(run) / "predictions.npz", min_cells=REAL_MIN_TEST_CELLS, n_boot=REAL_N_BOOT
        )

    rep = report(runs["main"])
    xs = {key: _cross_source(res) for key, res in runs.items() if key.startswith("xs_")}
    splits = {key: report(res) for key, res in runs.items() if key.startswith("split_")}
    payload = {
        "profile": profile,
        "machine": _machine(),
        "runs": {k: {**v, "command": _placeholder(v["command"], workdir)} for k, v in runs.items()},
        "test": rep,
        "cross_source": xs,
        "other_splits": splits,
        "import": real_import_reports(shared_data_dir()),
    }
    from training.evaluate_real import real_markdown

    md = real_markdown(payload) + "\n" + import_markdown(payload["import"])
    _write("real_cells" if profile == "cpu" else "real_cells_gpu", payload, md)
    return payload


SHIFT_SPLIT_COMMAND = (
    "python -m training.celltype --data ../shared/data --no-register --output "
    "DIR/real-cpu-splitK --config real-cpu --set crop_cache=DIR/crop-cache --set "
    "mix_synthetic=DIR/synth-attributes --set stain_aug=both --set stain_norm=background "
    "--set split_seed=K"
)
"""One more patient split of the main recipe (K = 1..4) for the five-split bar."""


def shift_suite(
    workdir: Path,
    tracking: str,
    *,
    typers: list[Path],
    split_runs: list[Path],
    case_norm: list[Path],
    cross_source: bool,
    shifts: list[str] | None = None,
    name: str = "shift",
    reuse: bool = False,
) -> dict[str, Any]:
    """The generalisation suite (`training.evaluate_shift`) on trained typers (their
    `training.celltype --output` folders), then `shift.{md,json}`."""
    from marrowscope.inference import load_predictor
    from training import evaluate_shift as es

    data = shared_data_dir()
    if not (data / "deepapl" / "cells.csv").is_file():
        raise SystemExit(f"{data}/deepapl is absent (see ../shared/data/README.md)")
    typers = typers or [workdir / "real-cpu"]
    unknown = [str(t) for t in case_norm if t not in typers]
    if unknown:
        raise SystemExit(f"--case-norm {unknown}: not among the --typer folders")
    config = es.run_config(typers[0])
    counts = es.split_test_counts(data, config, es.FIVE_SPLIT_SEEDS)
    fixed = es.fixed_class_list(counts, es.FIXED_MIN_CELLS)
    split_keys = ("split_seed", "test_fraction", "val_fraction", "real_train_sources", "pbc_split")
    if any(
        {k: es.run_config(t).get(k) for k in split_keys} != {k: config.get(k) for k in split_keys}
        for t in typers
    ):
        raise SystemExit("--typer: every typer must come from the same split (test them apart)")
    variants, origin = {}, {}
    for run in typers:
        typer = load_predictor(str(run / "model"))
        adapts = (False, True) if run in case_norm else (False,)
        for adapt in adapts:
            label = run.name + ("+case_norm" if adapt else "")
            variants[label], origin[label] = (typer, adapt), run
    shifts = shifts or list(es.SHIFT_NAMES)
    if "none" not in shifts or any(s not in es.SHIFT_NAMES for s in shifts):
        raise SystemExit(f"--shifts must include none and name only {', '.join(es.SHIFT_NAMES)}")
    sets = es.real_cell_sets(data, config, fixed)
    figures = es.evaluate_typers(variants, sets, shifts=shifts)
    results = {
        label: {
            "run": _placeholder(str(origin[label]), workdir),
            "case_norm": adapt,
            "sets": figures[label],
        }
        for label, (_, adapt) in variants.items()
    }
    runs: dict[str, dict[str, Any]] = {}
    xs: dict[str, Any] = {}
    if cross_source:  # leave one source out, with the first typer's stain option
        option = next(
            k
            for k, v in REAL_STAIN_OPTIONS.items()
            if v == (config.get("stain_aug", "none"), config.get("stain_norm", "none"))
        )
        common = ["--data", str(data), "--tracking-uri", tracking, "--no-register"]
        wbc = es.wbc_seg_cells(data / "wbc-seg")
        for src in ("deepapl", "pbc"):
            key = f"xs_{src}_{option}"
            flags = _xs_flags(common, _real_flags("cpu", workdir), workdir, src, option)
            runs[key] = _run("celltype", flags, reuse=reuse)
            xs[key] = _cross_source(runs[key])
            if wbc is not None:
                typer = load_predictor(str(_output_of(runs[key]) / "model"))
                one = es.evaluate_typers({key: (typer, False)}, [wbc], shifts=("none",))
                xs[key]["wbc_seg"] = one[key]["wbc_seg"]["shifts"]["none"]
    flags = [f"--typer {_placeholder(str(t), workdir)}" for t in typers]
    flags += [f"--split-run {_placeholder(str(t), workdir)}" for t in split_runs]
    if shifts != list(es.SHIFT_NAMES):
        flags.append(f"--shifts {','.join(shifts)}")
    if name != "shift":
        flags.append(f"--name {name}")
    payload = {
        "command": "python -m training.results shift --workdir DIR "
        + " ".join(
            [
                *flags,
                *[f"--case-norm {_placeholder(str(t), workdir)}" for t in case_norm],
                *(["--cross-source"] if cross_source else []),
            ]
        ),
        "machine": _machine(),
        "data": "real",
        "fixed_classes": {
            "classes": fixed,
            "min_cells": es.FIXED_MIN_CELLS,
            "seeds": list(es.FIVE_SPLIT_SEEDS),
            "test_counts": counts,
        },
        "typer": results,
        "runs": {k: {**v, "command": _placeholder(v["command"], workdir)} for k, v in runs.items()},
        "cross_source": xs,
        "split_bar": es.split_bar([typers[0], *split_runs], fixed),
        "split_command": SHIFT_SPLIT_COMMAND,
        "cell_size": {s.name: es.relative_cell_size(s) for s in sets},
    }
    _write(name, payload, es.shift_markdown(payload))
    return payload


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=("bccd", "synthetic", "real", "shift"))
    p.add_argument(
        "--workdir", type=Path, required=True, help="runs, models and the synthetic set go here"
    )
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<workdir>/mlflow.db")
    p.add_argument("--cases", type=int, default=SYNTH["cases"])
    p.add_argument(
        "--profile",
        choices=("cpu", "gpu"),
        default="cpu",
        help="bccd / real: CPU-feasible or GPU settings",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="synthetic / real: keep stages already run with the same command and config section",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="real: stop on a class folder the taxonomy does not map (default: report it)",
    )
    p.add_argument(
        "--typer",
        type=Path,
        action="append",
        default=[],
        help="shift: a training.celltype --output folder to test (repeatable; default "
        "<workdir>/real-cpu); the first one's split and stain option are the suite's",
    )
    p.add_argument(
        "--split-run",
        type=Path,
        action="append",
        default=[],
        help="shift: the same recipe on another split_seed, for the five-split bar (repeatable)",
    )
    p.add_argument(
        "--case-norm",
        type=Path,
        action="append",
        default=[],
        help="shift: also test this --typer folder with per-case BatchNorm statistics (repeatable)",
    )
    p.add_argument(
        "--shifts",
        type=lambda text: text.split(","),
        default=None,
        help="shift: a comma-separated subset of training.shifts.SHIFT_NAMES (with none); default all",
    )
    p.add_argument(
        "--name",
        default="shift",
        help="shift: the report's file name in bench/results (default shift: shift.{md,json})",
    )
    p.add_argument(
        "--cross-source",
        action="store_true",
        help="shift: train (or reuse) the leave-one-source-out runs and test them on wbc-seg",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    tracking = args.tracking_uri or f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    if args.which == "bccd":
        return bccd(args.workdir, tracking, args.profile)
    if args.which == "shift":
        return shift_suite(
            args.workdir,
            tracking,
            typers=args.typer,
            split_runs=args.split_run,
            case_norm=args.case_norm,
            cross_source=args.cross_source,
            shifts=args.shifts,
            name=args.name,
            reuse=True,
        )
    if args.which == "real":
        return real_cells(
            args.workdir, tracking, args.profile, reuse=args.reuse, strict=args.strict
        )
    if args.cases < 300:
        log.warning("--cases %d: the README figure needs >= 300 cases", args.cases)
    return synthetic(args.workdir, tracking, args.cases, reuse=args.reuse)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(get_args_parser().parse_args())
