"""`python -m bench.run --quick` end to end (tiny models, real service processes, one
repeat): the JSON has every section and every ratio is a finite positive number. No timing
assertions: speed is measured by `make bench`, never asserted in tests."""

from __future__ import annotations

import json
import math

import pytest

from bench.run import main


def _finite_positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_bench_writes_complete_results(tmp_path):
    out = tmp_path / "out"
    main(
        [
            "--quick",
            "--no-peer",
            "--concurrency",
            "1,2",
            "--pipeline-concurrency",
            "1",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    result = json.loads((out / "bench.json").read_text())
    assert {
        "machine",
        "per_model",
        "pipeline",
        "batching",
        "cold_start",
        "peak_rss_bytes",
        "generator_images_per_s",
        "peer",
        "segmentation_cells",
    } <= set(result)
    assert result["machine"]["logical_cores"] >= 1 and result["machine"]["torch"]
    assert {(r["model"], r["concurrency"]) for r in result["per_model"]} == {
        (m, c) for m in ("segmentation", "celltype", "ensemble", "npm1") for c in (1, 2)
    }
    segcells = result["segmentation_cells"]["rows"]
    assert [r["split"] for r in segcells] == ["classical", "learned"]
    assert all(r["cells_per_image"] >= 1 for r in segcells)
    assert all(
        _finite_positive(r[s]["cells_per_s"]) for r in segcells for s in ("batched", "per_cell")
    )
    for row in [*result["per_model"], *result["pipeline"], result["batching"], *segcells]:
        assert _finite_positive(row["throughput_ratio"]), row
        sides = [k for k, v in row.items() if isinstance(v, dict)]
        assert len(sides) == 2 and all(row[s]["errors"] == 0 for s in sides), row
    assert all(_finite_positive(v) for v in result["peak_rss_bytes"].values())
    assert set(result["peak_rss_bytes"]) == {
        "segmentation",
        "celltype",
        "ensemble",
        "npm1",
        "explain",
        "gateway",
    }
    assert all(_finite_positive(c["cold_start_s"]) for c in result["cold_start"])
    assert all(_finite_positive(v) for v in result["generator_images_per_s"].values())
    assert result["peer"]["ran"] is False
    assert "served / in-process" in (out / "bench.md").read_text()
