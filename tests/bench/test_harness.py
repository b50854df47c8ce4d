"""Units of the benchmark harness: closed-loop counting, quantiles, pairing, the report."""

from __future__ import annotations

import math
import threading

import pytest

from bench import harness, measure, report


def test_quantile_interpolates_and_handles_empty():
    assert harness.quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)
    assert harness.quantile([5.0], 0.99) == 5.0
    assert math.isnan(harness.quantile([], 0.5))


def test_closed_loop_counts_requests_and_errors():
    calls = []
    lock = threading.Lock()

    def make():
        def call():
            with lock:
                calls.append(1)
                n = len(calls)
            if n % 5 == 0:
                raise ValueError("every fifth call fails")

        return call

    result = harness.closed_loop(make, concurrency=3, per_thread=4, warmup=1)
    assert len(calls) == 3 * 5  # one warm-up + four timed calls per thread
    assert result.requests == 12
    assert result.errors == sum(1 for i in range(4, 16) if i % 5 == 0)
    assert result.first_error and "every fifth" in result.first_error
    assert result.throughput > 0 and result.p50_s <= result.p99_s


def test_run_concurrently_returns_what_calls_raised_and_hung_threads():
    seen, release = [], threading.Event()

    def fn(i):
        seen.append(i)
        if i == 1:
            raise ValueError("one")
        if i == 2:
            release.wait(10)

    try:
        errors = harness.run_concurrently(fn, 3, timeout=0.2)
    finally:
        release.set()
    assert sorted(seen) == [0, 1, 2]
    assert [type(e) for e in errors] == [ValueError, TimeoutError]
    assert "thread 2" in str(errors[1])
    assert harness.run_concurrently(lambda i: None, 4, timeout=5) == []


def test_closed_loop_rejects_bad_arguments():
    with pytest.raises(ValueError, match="concurrency"):
        harness.closed_loop(lambda: lambda: None, concurrency=0, per_thread=1)


def test_per_thread_for_bounds_the_run():
    assert harness.per_thread_for(3.0, 0.1, 1) == 30
    assert harness.per_thread_for(3.0, 0.1, 4) == 8
    assert harness.per_thread_for(1.0, 10.0, 16) == 1


def test_paired_reports_ratio_of_pairs():
    import time

    def sleeper(seconds):
        return lambda: lambda: time.sleep(seconds)

    # 0 s vs 50 ms per call: a 50 ms margin survives a heavily loaded machine
    row = measure.paired(
        sleeper(0.0), sleeper(0.05), concurrency=1, per_thread=3, repeats=2, names=("fast", "slow")
    )
    assert row["fast"]["throughput_per_s"] > row["slow"]["throughput_per_s"]
    assert row["throughput_ratio"] > 1.0 and row["p99_ratio"] < 1.0
    assert row["requests_per_repeat"] == 3 and row["repeats"] == 2


def test_machine_describes_the_host():
    info = harness.machine(threads=1)
    for key in ("cpu_model", "logical_cores", "ram_gib", "torch", "load_average_at_start"):
        assert info[key] not in (None, "")


def test_report_renders_a_peer_that_did_not_run():
    result = {
        "machine": harness.machine(1),
        "settings": {"repeats": 1},
        "sizes": {
            "name": "tiny",
            "image_wh": [128, 96],
            "crop": 32,
            "npm1_hw": [64, 64],
            "cells_per_image": 8,
        },
        "peer": {"peer": "ray_serve", "ran": False, "why": "ray is not installed"},
        "generator_images_per_s": {"128x96": 12.5},
        "elapsed_s": 1.0,
    }
    text = report.render(result)
    assert "Not run: ray is not installed" in text and "| 128x96 | 12.5 |" in text


def test_sweep_sizes_repeats_from_the_slower_side():
    import time

    def sleeper(seconds):
        return lambda: lambda: time.sleep(seconds)

    rows = measure.sweep(
        sleeper(0.001),
        sleeper(0.02),
        concurrencies=[1, 2],
        repeats=1,
        target_s=0.1,
        names=("a", "b"),
    )
    assert [r["concurrency"] for r in rows] == [1, 2]
    # sized from the 20 ms side: ~5 requests at concurrency 1, not ~100
    assert rows[0]["requests_per_repeat"] <= 10 and rows[1]["requests_per_repeat"] <= 10
