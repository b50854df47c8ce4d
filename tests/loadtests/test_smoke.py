"""Load-test smoke: the whole stack (five model services + gateway, real processes, tiny
registry models) under both locust scenarios for a short, bounded time; zero errors."""

from __future__ import annotations

import pytest

from loadtests.run import main


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_both_scenarios_run_without_errors(tmp_path):
    report = main(
        [
            "--quick",
            "--duration",
            "15",
            "--gateway-users",
            "2",
            "--oip-users",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    results = report["results"]
    assert set(results) == {"gateway", "oip"}
    for scenario, rows in results.items():
        assert rows, scenario
        failures = {r["name"]: r["failures"] for r in rows if r["failures"]}
        assert not failures, (scenario, failures)
        assert rows[-1]["name"] == "Aggregated" and rows[-1]["requests"] > 0
    names = {r["name"] for r in results["gateway"]}
    assert any(n.startswith("case:") for n in names)  # whole cases finished, not only submits
    assert {"segmentation", "celltype", "ensemble", "npm1"} <= {r["name"] for r in results["oip"]}
    assert (tmp_path / "out" / "loadtest.json").exists()
