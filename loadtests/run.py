"""`make loadtest`: start the stack, run both locust scenarios headless, report.

    python -m loadtests.run                       # demo-sized models, 60 s per scenario
    python -m loadtests.run --quick --duration 15 # tiny models (the smoke test's setting)

Starts the five model services and the gateway (`services.stack.LocalStack`) with
untrained models registered in a local SQLite MLflow registry (`bench.fixtures`), creates
an API key with the gateway's key CLI, then runs `locust --headless` as a subprocess for
`locustfile_gateway.py` (REST submit + poll, mixed case types) and `locustfile_oip.py`
(direct gRPC per model service). Prints per request name: requests, failures, error rate,
requests/s, p50/p95/p99 ms; writes `loadtest.json` and `loadtest.md` to `--out`.
Exit code 1 when any request failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import fixtures, workloads

log = logging.getLogger("loadtests")
HERE = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny models and images")
    p.add_argument("--duration", type=int, default=60, help="seconds per scenario (1..600)")
    p.add_argument("--gateway-users", type=int, default=4)
    p.add_argument("--oip-users", type=int, default=8)
    p.add_argument("--scenarios", default="gateway,oip", help="comma list of gateway, oip")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return p


def _ms(text: str) -> float | None:
    return None if text in ("", "N/A") else float(text)


def parse_stats(csv_path: Path) -> list[dict]:
    """Rows of locust's `<prefix>_stats.csv`: name, type, requests, failures, error_rate,
    rps, p50/p95/p99 ms (`Aggregated` last)."""
    rows = []
    with csv_path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            n, fails = int(rec["Request Count"]), int(rec["Failure Count"])
            rows.append(
                {
                    "type": rec["Type"],
                    "name": rec["Name"],
                    "requests": n,
                    "failures": fails,
                    "error_rate": fails / n if n else 0.0,
                    "rps": float(rec["Requests/s"]),
                    "p50_ms": _ms(rec["50%"]),
                    "p95_ms": _ms(rec["95%"]),
                    "p99_ms": _ms(rec["99%"]),
                }
            )
    return rows


def run_locust(
    locustfile: Path,
    *,
    users: int,
    duration_s: int,
    env: dict[str, str],
    prefix: Path,
    host: str | None = None,
) -> list[dict]:
    """`locust --headless` for `duration_s` seconds; returns `parse_stats` of its CSV."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{duration_s}s",
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "30",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    if host:
        cmd += ["--host", host]
    log.info("running %s", " ".join(cmd))
    out = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=duration_s + 180,
        check=False,
        cwd=HERE.parent,
    )
    stats = Path(f"{prefix}_stats.csv")
    if out.returncode != 0 or not stats.exists():
        raise RuntimeError(
            f"locust {locustfile.name} exited {out.returncode}:\n{out.stderr[-3000:]}"
        )
    return parse_stats(stats)


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| scenario | type | name | requests | failures | error rate | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, rows in results.items():
        for r in rows:
            lines.append(
                f"| {scenario} | {r['type']} | {r['name']} | {r['requests']} | "
                f"{r['failures']} | {r['error_rate']:.2%} | {r['rps']:.3g} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from bench.harness import machine
    from services.stack import LocalStack

    sizes = fixtures.TINY if args.quick else fixtures.DEMO
    info = machine(args.threads)
    tracking_uri, _ = fixtures.setup_registry(workdir, sizes)
    inputs_path = workloads.make_inputs(
        fixtures.synth_images(2, sizes.image), sizes.crop, sizes.npm1
    ).save(workdir / "inputs.npz")
    stack = LocalStack(
        workdir=workdir / "stack", tracking_uri=tracking_uri, env=fixtures.stack_env(args.threads)
    )
    results: dict[str, list[dict]] = {}
    try:
        stack.start(timeout_s=300)
        base = {
            **os.environ,
            "PYTHONPATH": str(HERE.parent),
            "MS_LOADTEST_INPUTS": str(inputs_path),
        }
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        if "gateway" in scenarios:
            env = {
                **base,
                "MS_LOADTEST_API_KEY": fixtures.create_api_key(stack.gateway_env(), "loadtest"),
            }
            results["gateway"] = run_locust(
                HERE / "locustfile_gateway.py",
                users=args.gateway_users,
                duration_s=args.duration,
                env=env,
                prefix=workdir / "gateway",
                host=stack.gateway_url,
            )
        if "oip" in scenarios:
            targets = {
                m: stack.grpc_addr(m) for m in ("segmentation", "celltype", "ensemble", "npm1")
            }
            env = {**base, "MS_LOADTEST_OIP_TARGETS": json.dumps(targets)}
            results["oip"] = run_locust(
                HERE / "locustfile_oip.py",
                users=args.oip_users,
                duration_s=args.duration,
                env=env,
                prefix=workdir / "oip",
            )
    finally:
        stack.stop()
    return {
        "machine": info,
        "sizes": sizes.name,
        "duration_s": args.duration,
        "users": {"gateway": args.gateway_users, "oip": args.oip_users},
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not 1 <= args.duration <= 600:
        raise SystemExit("--duration must be 1..600 seconds")
    unknown = {s.strip() for s in args.scenarios.split(",")} - {"gateway", "oip", ""}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: gateway, oip")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the stack's processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="marrowscope-loadtest-") as tmp:
        report = run(args, args.workdir or Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report["results"])
    (args.out / "loadtest.md").write_text(
        f"# Load test ({report['sizes']} models, {args.duration} s per scenario)\n\n{text}\n"
    )
    print(text)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["failures"] for rows in result["results"].values() for r in rows) else 0)
