"""`make loadtest`: start the stack, run both locust scenarios headless, report.

    python -m loadtests.run                       # demo-sized models, 60 s per scenario
    python -m loadtests.run --quick --duration 15 # tiny models (the smoke test's setting)
    python -m loadtests.run --quick --scenarios gateway --duration 40 --outage 15
                                                  # segmentation SIGKILLed for 15 s under load

Starts the five model services and the gateway (`services.stack.LocalStack`) with
untrained models registered in a local SQLite MLflow registry (`bench.fixtures`), creates
an API key with the gateway's key CLI, then runs `locust --headless` as a subprocess for
`locustfile_gateway.py` (REST submit + poll, mixed case types) and `locustfile_oip.py`
(direct gRPC per model service). Prints per request name: requests, failures, error rate,
requests/s, p50/p95/p99 ms; writes `loadtest.json` and `loadtest.md` to `--out`.
Exit code 1 when any request failed.

`--outage S` is the outage drill (issue 14 item 1): during the gateway scenario the
segmentation service is SIGKILLed a quarter into the run and restarted S seconds later on the
same port. Every case still has to end `succeeded` (a failed case counts as a failure), so a
clean run shows that an outage longer than the call retries delays analyses, not fails them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench import fixtures, workloads
from loadtests import summary

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
    p.add_argument(
        "--outage",
        type=float,
        default=0.0,
        help="seconds the segmentation service is killed during the gateway scenario (0: none)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return p


def _wait_or_kill(
    proc: subprocess.Popen[bytes], summary_path: Path, *, deadline: float, exit_grace_s: float
) -> int | None:
    """The exit code, or None when the process group had to be killed: `exit_grace_s` after
    its summary appeared (its run is over: only the way out stalled), or at `deadline`."""
    summary_seen: float | None = None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if summary_seen is None and summary_path.exists():
            summary_seen = now
        stalled = summary_seen is not None and now - summary_seen > exit_grace_s
        if stalled or now > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def run_locust(
    locustfile: Path,
    *,
    users: int,
    duration_s: int,
    env: dict[str, str],
    prefix: Path,
    host: str | None = None,
    exit_grace_s: float = 120.0,
) -> list[dict]:
    """`locust --headless` for `duration_s` seconds; returns the rows of the summary the
    locustfile writes at `quit` (`loadtests.summary`, `<prefix>_summary.json`).

    A process still alive `exit_grace_s` after writing its summary (it stalled on the way
    out) is killed, the run counts and a warning is logged; one still alive `exit_grace_s`
    after its run time (plus locust's 30 s stop timeout) without a summary is killed and
    is an error with the tail of locust's output."""
    summary_path = Path(f"{prefix}_summary.json")
    summary_path.unlink(missing_ok=True)
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
    log_path = Path(f"{prefix}_locust.log")
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            env={**env, "MS_LOADTEST_SUMMARY": str(summary_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=HERE.parent,
            start_new_session=True,
        )
        code = _wait_or_kill(
            proc,
            summary_path,
            deadline=time.monotonic() + duration_s + 30 + exit_grace_s,
            exit_grace_s=exit_grace_s,
        )
    tail = log_path.read_text(errors="replace")[-3000:]
    if summary_path.exists() and code in (0, None):
        if code is None:
            log.warning("locust %s wrote its summary but did not exit; killed", locustfile.name)
        return summary.read(summary_path)
    state = "did not finish in time" if code is None else f"exited {code}"
    raise RuntimeError(
        f"locust {locustfile.name} {state} (summary written: {summary_path.exists()}):\n{tail}"
    )


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
    outage: dict | None = None
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
            drill = None
            if args.outage:
                env["MS_LOADTEST_CASE_TIMEOUT_S"] = str(300 + args.outage)
                drill = OutageDrill(stack, "segmentation", args.duration / 4, args.outage)
                drill.start()
            try:
                results["gateway"] = run_locust(
                    HERE / "locustfile_gateway.py",
                    users=args.gateway_users,
                    duration_s=args.duration,
                    env=env,
                    prefix=workdir / "gateway",
                    host=stack.gateway_url,
                )
            finally:
                if drill is not None:
                    outage = drill.finish()
            if outage is not None:
                outage["analyses"] = drain(stack.gateway_url, env["MS_LOADTEST_API_KEY"], outage)
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
        "outage": outage,
        "results": results,
    }


def drain(url: str, key: str, outage: dict, timeout_s: float = 300.0) -> dict:
    """After the drill: wait until every analysis the run submitted is finished (locust stops
    users mid-case), then count final statuses, overall and for the analyses that were
    pending while the service was down (created before it came back, not finished before it
    was killed)."""
    from datetime import datetime

    import httpx

    def when(text: str | None) -> float | None:
        return None if text is None else datetime.fromisoformat(text).timestamp()

    end = time.monotonic() + timeout_s
    items: list[dict] = []
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
        while True:
            items, offset = [], 0
            while True:
                page = client.get("/v1/analyses", params={"limit": 200, "offset": offset}).json()
                items += page["items"]
                offset += 200
                if offset >= page["total"]:
                    break
            pending = [a for a in items if a["status"] in ("queued", "running")]
            if not pending or time.monotonic() > end:
                break
            time.sleep(1.0)
    killed, back = outage.get("killed_epoch", 0.0), outage.get("back_epoch", float("inf"))
    hit = [
        a
        for a in items
        if when(a["created_at"]) < back
        and (a["finished_at"] is None or when(a["finished_at"]) > killed)
    ]
    return {
        "total": len(items),
        "statuses": dict(Counter(a["status"] for a in items)),
        "during_outage": dict(Counter(a["status"] for a in hit)),
    }


class OutageDrill(threading.Thread):
    """Kill `service` after `at_s` seconds, restart it `down_s` seconds later."""

    def __init__(self, stack, service: str, at_s: float, down_s: float) -> None:
        super().__init__(daemon=True, name="outage-drill")
        self.stack, self.service, self.at_s, self.down_s = stack, service, at_s, down_s
        self.stop = threading.Event()
        self.record: dict = {"service": service, "planned_down_s": down_s}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.stop.wait(self.at_s):
                return
            t0 = time.monotonic()
            log.warning("outage drill: killing %s for %.0f s", self.service, self.down_s)
            self.stack.kill(self.service)
            self.record["killed_at_s"] = round(self.at_s, 1)
            self.record["killed_epoch"] = time.time()
            self.stop.wait(self.down_s)
            self.stack.restart(self.service)
            self.record["back_epoch"] = time.time()
            self.record["down_s"] = round(time.monotonic() - t0, 1)
            log.warning("outage drill: %s is back", self.service)
        except BaseException as exc:  # reported by finish(); the run must not hang
            self.error = exc

    def finish(self) -> dict:
        self.join(timeout=self.at_s + self.down_s + 300)
        if self.error is not None:
            raise RuntimeError(f"outage drill failed: {self.error}") from self.error
        return self.record


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not 1 <= args.duration <= 600:
        raise SystemExit("--duration must be 1..600 seconds")
    if not 0 <= args.outage <= args.duration / 2:
        raise SystemExit("--outage must be 0..duration/2 seconds (it starts a quarter in)")
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
    if report["outage"]:
        o = report["outage"]
        text += (
            f"\n\nOutage drill: {o['service']} SIGKILLed at {o.get('killed_at_s')} s into the "
            f"gateway scenario, back (SERVING) after {o.get('down_s')} s. Final statuses of "
            f"the {o['analyses']['total']} analyses submitted: {o['analyses']['statuses']}; "
            f"of those pending during the outage: {o['analyses']['during_outage']}."
        )
    (args.out / "loadtest.md").write_text(
        f"# Load test ({report['sizes']} models, {args.duration} s per scenario)\n\n{text}\n"
    )
    print(text)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["failures"] for rows in result["results"].values() for r in rows) else 0)
