"""The pipeline-under-load report: folding py-spy samples, the two targets, the exit rule."""

from __future__ import annotations

import pytest

from bench import pipeline_load


def _row(c: int, gateway: float, in_process: float) -> dict:
    side = {"p50_s": 1.0, "p99_s": 2.0, "errors": 0, "first_error": None}
    return {
        "concurrency": c,
        "gateway": {**side, "throughput_per_s": gateway},
        "in_process": {**side, "throughput_per_s": in_process},
        "throughput_ratio": gateway / in_process,
    }


def test_fold_ranks_leaf_frames_by_self_samples():
    raw = "\n".join(
        [
            "main (a.py:1);run (a.py:5);forward (m.py:9) 30",
            "main (a.py:1);poll (a.py:7) 10",
            "main (a.py:1);other;forward (m.py:9) 10",
            "not a sample line",
        ]
    )
    assert pipeline_load.fold(raw, top=2) == [("forward (m.py:9)", 0.8), ("poll (a.py:7)", 0.2)]
    assert pipeline_load.fold("", top=3) == []


@pytest.mark.parametrize(
    ("rows", "scales", "ratio_held"),
    [
        ([_row(1, 0.50, 0.55), _row(4, 0.60, 0.62)], True, True),
        ([_row(1, 0.50, 0.55), _row(4, 0.38, 0.70)], False, False),  # the figures
        ([_row(1, 0.50, 0.52), _row(4, 0.55, 0.70)], True, False),
    ],
)
def test_targets_and_exit_rule(rows, scales, ratio_held):
    t = pipeline_load.targets(rows, min_ratio=0.9)
    assert t["gateway_never_lower_under_load"]["held"] is scales
    assert t["served_over_in_process"]["held"] is ratio_held
    result = {
        "machine": {
            "cpu_model": "x",
            "usable_cores": 2,
            "torch_threads_per_process": 1,
            "started_at": "t",
            "load_average_at_start": [0, 0, 0],
        },
        "settings": {"repeats": 1},
        "configs": {"auto": {"rows": rows, "targets": t}},
        "elapsed_s": 1.0,
    }
    assert pipeline_load.held(result) is (scales and ratio_held)
    text = pipeline_load.markdown(result)
    assert ("MISSED" in text) is not (scales and ratio_held)
    assert "| auto | 4 |" in text
