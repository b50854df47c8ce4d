"""The final statistics of a locust run, written by the locustfile itself at `quit`.

`python -m loadtests.run` reads this summary, not locust's CSV: locust writes its CSV every
second but flushes it every ten and closes it only after `quit`, and with gRPC under gevent
the process can stall in interpreter finalisation after that point (grpc/grpc#20299 family;
CI timed out twice on a locust process that had printed its summary and never exited). A
watchdog thread cannot end such a process: once finalisation has begun, a thread that
wakes and asks for the GIL is parked for good. So a locustfile that talks gRPC installs
this with `hard_exit=True`: the summary is written atomically in the `quit` listener and
the process ends there with `os._exit`, before finalisation starts.

Environment: MS_LOADTEST_SUMMARY  path of the JSON file to write (unset: nothing written).
"""

from __future__ import annotations

import json
import os
import sys
from itertools import chain
from pathlib import Path

PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}


def rows(stats) -> list[dict]:
    """One row per request type and name, `Aggregated` last: requests, failures,
    error_rate, rps and p50/p95/p99 in ms (None without requests)."""
    from locust.stats import sort_stats

    out = []
    for entry in chain(sort_stats(stats.entries), [stats.total]):
        n, fails = entry.num_requests, entry.num_failures
        row = {
            "type": entry.method or "",
            "name": entry.name,
            "requests": n,
            "failures": fails,
            "error_rate": fails / n if n else 0.0,
            "rps": float(entry.total_rps),
        }
        for key, q in PERCENTILES.items():
            row[key] = float(entry.get_response_time_percentile(q)) if n else None
        out.append(row)
    return out


def write(path: Path, stats) -> None:
    """`rows(stats)` as JSON at `path`, via a temporary file and a rename (a reader never
    sees half a summary)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows(stats), indent=1) + "\n")
    os.replace(tmp, path)


def read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def install(events, *, hard_exit: bool) -> None:
    """Register the listeners on a locustfile's `events`: remember the environment at
    `init`, write the summary at `quit`, and with `hard_exit` end the process there."""
    state: dict = {}

    @events.init.add_listener
    def _remember(environment, **_kwargs) -> None:
        state["environment"] = environment

    @events.quit.add_listener
    def _final(exit_code: int, **_kwargs) -> None:
        target = os.environ.get("MS_LOADTEST_SUMMARY")
        environment = state.get("environment")
        if target and environment is not None:
            write(Path(target), environment.stats)
        if hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)
