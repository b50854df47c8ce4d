"""Load-test smoke: the whole stack (five model services + gateway, real processes, tiny
registry models) under the OIP locust scenario for a short, bounded time; zero errors.

The gateway scenario runs in `test_outage_smoke.py`, under load before, during and after a
segmentation outage (its zero-error and whole-case assertions are there): running it here
too would start the stack and the scenario a second time for nothing it does not check."""

from __future__ import annotations

import pytest

from loadtests.run import main


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_oip_scenario_runs_without_errors(tmp_path):
    report = main(
        [
            "--quick",
            "--scenarios",
            "oip",
            "--duration",
            "15",
            "--oip-users",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    results = report["results"]
    assert set(results) == {"oip"}
    rows = results["oip"]
    failures = {r["name"]: r["failures"] for r in rows if r["failures"]}
    assert not failures, failures
    assert rows[-1]["name"] == "Aggregated" and rows[-1]["requests"] > 0
    assert {"segmentation", "celltype", "ensemble", "npm1"} <= {r["name"] for r in rows}
    assert (tmp_path / "out" / "loadtest.json").exists()
