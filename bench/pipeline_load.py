"""Whole-pipeline throughput under load, with a profile of every process.

Starts the stack (gateway + five services) on the benchmark's untrained DEMO-size models,
measures gateway cases/s against one process doing the same work (`bench.workloads`) at each
concurrency, and while the gateway runs at the highest concurrency samples every process
with py-spy (`py-spy record --format raw`, folded stacks). The report lists each process's
top frames (self time, on-CPU only) so a slow stage points at the code that costs it.

    python -m bench.pipeline_load --out DIR [--concurrency 1,4] [--repeats 2] [--no-hold]

Two configurations run one after the other on the same models and inputs (`CONFIGS`):
every predictor service with one model thread (how they ran before `model_threads`) and
the default. The default must hold the targets (gateway cases/s at the highest concurrency
not below concurrency 1; gateway / in-process >= 0.9 there) or the run exits 1.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fixtures, harness, measure, workloads

log = logging.getLogger(__name__)

RATE_HZ = 50  # py-spy samples per second and process


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=None, help="write pipeline_load.json/.md here")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target-s", type=float, default=6.0, help="aimed seconds per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--profile-s", type=float, default=20.0, help="0: no py-spy profile")
    p.add_argument("--top", type=int, default=8)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        type=lambda kv: tuple(kv.split("=", 1)),
        help="KEY=VALUE added to every configuration's stack environment",
    )
    p.add_argument("--configs", default="one_model_thread,auto", help=f"among {list(CONFIGS)}")
    p.add_argument("--min-ratio", type=float, default=0.9)
    p.add_argument(
        "--no-hold", action="store_true", help="report only; exit 0 when a target is missed"
    )
    return p


def fold(raw: str, top: int) -> list[tuple[str, float]]:
    """Top self-time frames of py-spy's raw (folded) output, as (frame, share of samples)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] += int(n)
        total += int(n)
    return [(frame, n / total) for frame, n in counts.most_common(top)] if total else []


def profile(pids: dict[str, int], seconds: float, top: int, workdir: Path) -> dict:
    """py-spy every pid at once for `seconds`; per process its sample count and top frames."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        return {"ran": False, "why": "py-spy not installed"}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    procs = {}
    for name, pid in pids.items():
        out = workdir / f"{name}.txt"
        procs[name] = (
            out,
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--format",
                    "raw",
                    "--rate",
                    str(RATE_HZ),
                    "--nonblocking",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
    result: dict[str, dict[str, Any]] = {}
    for name, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0 or not out.exists():
            result[name] = {"error": err.decode(errors="replace")[-300:]}
            continue
        raw = out.read_text()
        samples = sum(int(line.rpartition(" ")[2]) for line in raw.splitlines() if line.strip())
        result[name] = {"samples": samples, "top": fold(raw, top)}
    for name, pid in pids.items():
        before, after = cpu_before[name], cpu_seconds(pid)
        if name in result and before is not None and after is not None:
            result[name]["cpu_s"] = round(after - before, 2)
    return {"ran": True, "seconds": seconds, "processes": result}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far, all threads (/proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CONFIGS: dict[str, dict[str, str]] = {
    # the services as they ran before `model_threads`: one model call at a time each
    "one_model_thread": {
        f"MS_{name}_MODEL_THREADS": "1" for name in ("SEGMENTATION", "CELLTYPE", "ENSEMBLE", "NPM1")
    },
    "auto": {},  # model_threads = 0: usable cores // torch threads on a CPU
}


def _loaded_profile(stack, served, concurrency: int, args, workdir: Path) -> dict:
    """py-spy every process of `stack` while `concurrency` threads keep submitting cases."""
    import threading

    stop = threading.Event()

    def load() -> None:
        case = served()
        while not stop.is_set():
            try:
                case()
            except workloads.CaseFailed as exc:
                log.warning("case failed under profiling load: %s", exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        time.sleep(3.0)  # let the load reach steady state before sampling
        pids = {name: p.popen.pid for name, p in stack.procs.items()}
        workdir.mkdir(parents=True, exist_ok=True)
        out = profile(pids, args.profile_s, args.top, workdir)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)
    out["concurrency"] = concurrency
    return out


def targets(rows: list[dict], min_ratio: float) -> dict:
    """The issue-22 targets on one configuration's rows: gateway cases/s at the highest
    concurrency never below concurrency 1, and gateway / in-process >= `min_ratio` there."""
    by_c = {r["concurrency"]: r for r in rows}
    lo, hi = by_c[min(by_c)], by_c[max(by_c)]
    scales = hi["gateway"]["throughput_per_s"] >= lo["gateway"]["throughput_per_s"]
    ratio = hi["throughput_ratio"]
    return {
        "gateway_never_lower_under_load": {
            "held": bool(scales),
            "c_low": lo["concurrency"],
            "c_high": hi["concurrency"],
            "low_cases_per_s": lo["gateway"]["throughput_per_s"],
            "high_cases_per_s": hi["gateway"]["throughput_per_s"],
        },
        "served_over_in_process": {
            "held": bool(ratio >= min_ratio),
            "at_concurrency": hi["concurrency"],
            "ratio": ratio,
            "min": min_ratio,
        },
    }


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from services.stack import LocalStack

    torch.set_num_threads(args.threads)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sizes = fixtures.DEMO
    uri, versions = fixtures.setup_registry(workdir, sizes)
    images = fixtures.synth_images(2, sizes.image)
    inputs = workloads.make_inputs(images, sizes.crop, sizes.npm1)
    predictors = workloads.Predictors.load({k: workdir / "models" / k for k in fixtures.KINDS})
    inproc = workloads.inprocess_pipeline(predictors, inputs)
    t0 = time.perf_counter()
    result: dict = {
        "machine": harness.machine(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_versions": versions,
        "configs": {},
    }
    for name in args.configs.split(","):
        env = fixtures.stack_env(args.threads, {**CONFIGS[name], **dict(args.env)})
        stack = LocalStack(workdir=workdir / name, tracking_uri=uri, env=env)
        try:
            stack.start(timeout_s=300)
            key = fixtures.create_api_key(stack.gateway_env())
            served = workloads.gateway_pipeline(stack.gateway_url, key, inputs)
            rows = measure.sweep(
                served,
                inproc,
                concurrencies=concurrencies,
                repeats=args.repeats,
                target_s=args.target_s,
                names=("gateway", "in_process"),
            )
            config = {"env": CONFIGS[name], "rows": rows, "targets": targets(rows, args.min_ratio)}
            if args.profile_s > 0:
                config["profile"] = _loaded_profile(
                    stack, served, max(concurrencies), args, workdir / f"profile-{name}"
                )
        finally:
            stack.stop()
        result["configs"][name] = config
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Whole pipeline under load (`python -m bench.pipeline_load`)",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch "
        f"{m['torch_threads_per_process']} thread(s) per process; started {m['started_at']}, "
        f"load average then {m['load_average_at_start']}. DEMO sizes, untrained models "
        "(throughput only); cases alternate 1 and 2 images; medians over "
        f"{result['settings']['repeats']} repeats, ratios paired per repeat.",
        "",
        "Configurations: `one_model_thread` = every predictor service runs one model call at "
        "a time (`MS_<SERVICE>_MODEL_THREADS=1`, the services before this setting); `auto` = "
        "the default (`MODEL_THREADS=0`: usable cores / torch threads on a CPU).",
        "",
        "| config | concurrency | gateway cases/s | in-process cases/s | gateway / in-process "
        "| gateway p50 / p99 s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, config in result["configs"].items():
        for r in config["rows"]:
            g, i = r["gateway"], r["in_process"]
            lines.append(
                f"| {name} | {r['concurrency']} | {g['throughput_per_s']:.3g} | "
                f"{i['throughput_per_s']:.3g} | {r['throughput_ratio']:.3g} | "
                f"{g['p50_s']:.2f} / {g['p99_s']:.2f} | {g['errors'] + i['errors']} |"
            )
    lines += ["", "## Targets (issue 22 §12)", ""]
    for name, config in result["configs"].items():
        t = config["targets"]
        a, b = t["gateway_never_lower_under_load"], t["served_over_in_process"]
        lines.append(
            f"- `{name}`: gateway at c={a['c_high']} {a['high_cases_per_s']:.3g} vs "
            f"c={a['c_low']} {a['low_cases_per_s']:.3g} cases/s: "
            f"**{'held' if a['held'] else 'MISSED'}**; gateway / in-process at "
            f"c={b['at_concurrency']} {b['ratio']:.3g} (>= {b['min']}): "
            f"**{'held' if b['held'] else 'MISSED'}**"
        )
    for name, config in result["configs"].items():
        prof = config.get("profile")
        if not prof:
            continue
        lines += ["", f"## Profile `{name}` at concurrency {prof.get('concurrency')}", ""]
        if not prof.get("ran"):
            lines.append(f"not run: {prof.get('why')}")
            continue
        lines.append(
            f"py-spy, {prof['seconds']:.0f} s at {RATE_HZ} Hz per process, all threads, idle "
            "frames left out by py-spy; samples = busy thread-samples "
            f"({prof['seconds'] * RATE_HZ:.0f} = one thread busy all the time). "
            "CPU s = the process's user + system CPU time over the window (all threads). "
            "Top frames by self time:"
        )
        for proc, p in sorted(prof["processes"].items()):
            if "error" in p:
                lines.append(f"\n**{proc}**: py-spy failed: {p['error']}")
                continue
            top = "; ".join(f"{share:.0%} `{frame}`" for frame, share in p["top"][:5])
            cpu = f"{p['cpu_s']:.1f} CPU s, " if "cpu_s" in p else ""
            lines.append(f"\n**{proc}** ({cpu}{p['samples']} samples): {top}")
    lines += ["", f"Total time: {result['elapsed_s']} s.", ""]
    return "\n".join(lines)


def held(result: dict) -> bool:
    auto = result["configs"].get("auto")
    return auto is None or all(t["held"] for t in auto["targets"].values())


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ms-pipeload-") as tmp:
        result = run(args, args.workdir or Path(tmp))
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pipeline_load.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / "pipeline_load.md").write_text(text)
    if not held(result) and not args.no_hold:
        raise SystemExit(
            "pipeline_load: a target was missed under the auto configuration (see the report)"
        )
    return result


if __name__ == "__main__":
    main()
