"""`python -m bench.slide_throughput --quick` end to end: tiny models, a tiny synthetic slide,
real service processes with two segmentation replicas and two gateways. The JSON has every
field with positive numbers; no timing assertions (speed is measured, never asserted)."""

from __future__ import annotations

import json
import math

import pytest

from bench.slide_throughput import main


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_slide_bench_writes_complete_results(tmp_path):
    out = tmp_path / "out"
    main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "work")])
    result = json.loads((out / "slide_throughput.json").read_text())
    assert result["slides_are_synthetic"] and result["models"].startswith("untrained")
    t, m = result["throughput"], result["memory"]
    assert {r["replicas"] for r in t["rows"]} == {1, 2}
    for row in [*t["rows"], m]:
        for key in ("tiles", "seconds_to_tiles_cut", "seconds_to_result", "tiles_per_s"):
            assert _positive(row[key]), (key, row)
        assert row["seconds_to_tiles_cut"] <= row["seconds_to_result"]
    assert set(t["summary"]) == {"1", "2"}
    assert _positive(t["scaling_ratio"])
    # the 1-replica gateway dials one replica; the balanced one reaches both
    one, two = t["segmentation_calls_per_replica"]["1"], t["segmentation_calls_per_replica"]["2"]
    assert one["segmentation"] > 0 and one["segmentation-1"] == 0
    assert min(two.values()) > 0
    for key in (
        "small_slide_peak_rss_mib",
        "large_slide_peak_rss_mib",
        "large_to_small_rss_ratio",
        "large_to_small_pixel_ratio",
    ):
        assert _positive(m[key]), key
    assert result["slides"]["large"]["megapixels"] > result["slides"]["throughput"]["megapixels"]
    assert (out / "slide_throughput.md").read_text().startswith("## Slide throughput")
