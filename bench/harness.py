"""Closed-loop load generation, latency statistics and the machine description.

`closed_loop(make_worker, concurrency, per_thread)` starts `concurrency` threads; each builds
its own worker (`make_worker()` -> a no-argument callable that performs one request, e.g.
with its own gRPC client), makes one untimed warm-up call, waits for the others, then makes
`per_thread` timed calls back to back. Throughput = completed requests / wall time from the
common start to the last completion.

`run_concurrently(fn, n_threads, timeout)` is the bare start-N-threads-and-wait underneath it,
also used by the tests that check servers batch concurrent requests.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

Worker = Callable[[], object]


@dataclass
class LoadResult:
    """One closed-loop run: counts, wall seconds, requests/s, latency quantiles in seconds."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_s: float
    p95_s: float
    p99_s: float
    first_error: str | None = None
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("latencies_s")
        return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_concurrently(
    fn: Callable[[int], object], n_threads: int, timeout: float | None = None
) -> list[BaseException]:
    """Call `fn(i)` for i in 0..n_threads-1, each in its own thread, and wait for them all.

    Returns what the calls raised (empty when every call returned), plus a `TimeoutError` for
    each thread still running `timeout` seconds after the start (None waits for ever), so a
    hung call is a failure rather than a silent pass. Threads are daemons: a hung one cannot
    keep the interpreter alive.
    """
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # handed to the caller, who decides what a failure is
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_threads)]
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.start()
    for i, t in enumerate(threads):
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            errors.append(TimeoutError(f"thread {i} still running after {timeout} s"))
    return errors


def closed_loop(
    make_worker: Callable[[], Worker], concurrency: int, per_thread: int, *, warmup: int = 1
) -> LoadResult:
    """Run `concurrency` threads x `per_thread` timed requests (see module docstring).

    A request that raises counts as an error (its latency is not recorded); the first
    error's message is kept.
    """
    if concurrency < 1 or per_thread < 1:
        raise ValueError(
            f"concurrency and per_thread must be >= 1, got {concurrency}, {per_thread}"
        )
    starts: list[float] = []
    barrier = threading.Barrier(concurrency, action=lambda: starts.append(time.perf_counter()))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    ends: list[float] = []

    def run(_: int) -> None:
        try:
            worker = make_worker()
            for _ in range(warmup):
                worker()
        except Exception as exc:  # recorded as an error of this thread; the run goes on
            with lock:
                errors.append(f"setup/warm-up: {type(exc).__name__}: {exc}")
            barrier.wait()
            return
        barrier.wait()
        mine: list[float] = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                worker()
            except Exception as exc:  # counted; load tests report the error rate
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            ends.append(time.perf_counter())

    faults = run_concurrently(run, concurrency)
    if faults:  # request errors are counted above; anything else is a fault of the harness
        raise faults[0]
    seconds = (max(ends) if ends else time.perf_counter()) - starts[0]
    done = len(latencies)
    return LoadResult(
        concurrency,
        done + len(errors),
        len(errors),
        seconds,
        done / seconds if seconds > 0 else math.nan,
        quantile(latencies, 0.5),
        quantile(latencies, 0.95),
        quantile(latencies, 0.99),
        errors[0] if errors else None,
        latencies,
    )


def per_thread_for(
    target_s: float, single_latency_s: float, concurrency: int, minimum: int = 1
) -> int:
    """Requests per thread so that a run lasts about `target_s` if the work is serial."""
    total = target_s / max(single_latency_s, 1e-6)
    return max(minimum, math.ceil(total / concurrency))


def time_one(fn: Worker, n: int = 2) -> float:
    """Median seconds of `n` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(threads: int) -> dict:
    """What the numbers were measured on, including the load before the run started."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_per_process": threads,
        "cuda": torch.cuda.is_available(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


class RssSampler(threading.Thread):
    """Peak RSS (bytes) of one process, sampled every `every_s` until `stop` is set."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc, self.every_s = psutil.Process(pid), every_s
        self.peak, self.samples, self.stop = 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()
