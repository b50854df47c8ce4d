"""Paired measurements: two ways of doing the same work, run alternately, repeat by repeat.

Every comparison here runs A then B inside each repeat, with the same concurrency and the
same number of requests, and reports the median over repeats of A's and B's figures and
the median of the per-repeat ratios A/B (so a slow moment of the shared machine hits both
sides of a pair, not one side of the table).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import LoadResult, closed_loop, median, per_thread_for, time_one

log = logging.getLogger(__name__)

Factory = Callable[[], Callable[[], object]]


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def paired(
    a: Factory,
    b: Factory,
    *,
    concurrency: int,
    per_thread: int,
    repeats: int,
    names: tuple[str, str],
) -> dict:
    """Run `a` and `b` alternately `repeats` times; figures per side and per-pair ratios."""
    runs: dict[str, list[LoadResult]] = {names[0]: [], names[1]: []}
    for _ in range(repeats):
        for name, factory in zip(names, (a, b), strict=True):
            result = closed_loop(factory, concurrency, per_thread)
            if result.errors:
                log.warning(
                    "%s at concurrency %d: %d errors (%s)",
                    name,
                    concurrency,
                    result.errors,
                    result.first_error,
                )
            runs[name].append(result)
    out: dict = {
        "concurrency": concurrency,
        "requests_per_repeat": concurrency * per_thread,
        "repeats": repeats,
    }
    for name, results in runs.items():
        out[name] = {
            "throughput_per_s": median([r.throughput for r in results]),
            "p50_s": median([r.p50_s for r in results]),
            "p99_s": median([r.p99_s for r in results]),
            "errors": sum(r.errors for r in results),
            "first_error": next((r.first_error for r in results if r.first_error), None),
        }
    a_runs, b_runs = runs[names[0]], runs[names[1]]
    out["throughput_ratio"] = median(
        [_ratio(x.throughput, y.throughput) for x, y in zip(a_runs, b_runs, strict=True)]
    )
    out["p50_ratio"] = median(
        [_ratio(x.p50_s, y.p50_s) for x, y in zip(a_runs, b_runs, strict=True)]
    )
    out["p99_ratio"] = median(
        [_ratio(x.p99_s, y.p99_s) for x, y in zip(a_runs, b_runs, strict=True)]
    )
    log.info(
        "%s vs %s at c=%d: %.3g/s vs %.3g/s (ratio %.3f)",
        *names,
        concurrency,
        out[names[0]]["throughput_per_s"],
        out[names[1]]["throughput_per_s"],
        out["throughput_ratio"],
    )
    return out


def sweep(
    a: Factory,
    b: Factory,
    *,
    concurrencies: list[int],
    repeats: int,
    target_s: float,
    names: tuple[str, str],
) -> list[dict]:
    """`paired` at each concurrency; requests per repeat sized from one serial call of the
    slower side so that its repeat lasts about `target_s` (at least one request per thread)."""
    latency = max(time_one(a(), n=1), time_one(b(), n=1))
    return [
        paired(
            a,
            b,
            concurrency=c,
            per_thread=per_thread_for(target_s, latency, c),
            repeats=repeats,
            names=names,
        )
        for c in concurrencies
    ]


def cold_start(
    name: str, tracking_uri: str, workdir: Path, env: dict[str, str], repeats: int
) -> dict:
    """Seconds from spawning `python -m services.<name>` to gRPC health SERVING (model
    resolved from the registry, loaded and warmed up); median over `repeats` starts."""
    from services.stack import LocalStack

    times = []
    for r in range(repeats):
        stack = LocalStack(
            workdir=workdir / f"cold-{name}-{r}",
            tracking_uri=tracking_uri,
            env=env,
            services=(name,),
            with_gateway=False,
        )
        t0 = time.perf_counter()
        try:
            stack.start(timeout_s=300)
            times.append(time.perf_counter() - t0)
        finally:
            stack.stop()
    return {
        "service": name,
        "cold_start_s": median(times),
        "repeats": repeats,
        "all_s": [round(t, 2) for t in times],
    }


class PeerProcess:
    """`python -m bench.peer_ray` as a subprocess; `start()` waits for its READY line."""

    def __init__(
        self,
        model_dir: Path,
        port: int,
        threads: int,
        max_batch_size: int,
        max_queue_delay_ms: float,
        log_path: Path,
    ) -> None:
        from marrowscope.paths import PROJECT_ROOT

        self.log_path = log_path
        env = {
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "OMP_NUM_THREADS": str(threads),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.url = f"http://127.0.0.1:{port}/npm1"
        with log_path.open("wb") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.peer_ray",
                    "--model-dir",
                    str(model_dir),
                    "--port",
                    str(port),
                    "--threads",
                    str(threads),
                    "--max-batch-size",
                    str(max_batch_size),
                    "--max-queue-delay-ms",
                    str(max_queue_delay_ms),
                ],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self, timeout_s: float = 300.0) -> PeerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Ray Serve peer exited with {self.proc.returncode}: {self.tail()}"
                )
            if "READY" in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Ray Serve peer not ready after {timeout_s} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        """SIGTERM the driver (it shuts Serve and Ray down), then SIGKILL whatever of its
        own process group (Ray's gcs/raylet/workers) is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("Ray Serve peer did not stop within 60 s: killing its group")
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def ray_worker(url: str, body: bytes) -> Factory:
    """Factory of per-thread HTTP workers posting `body` to the Ray Serve peer."""

    def make() -> Callable[[], object]:
        import httpx

        client = httpx.Client(timeout=600.0)

        def call() -> float:
            r = client.post(url, content=body, headers={"content-type": "application/octet-stream"})
            r.raise_for_status()
            return r.json()["p_npm1"]

        return call

    return make
