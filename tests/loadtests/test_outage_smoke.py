"""Outage drill under load (issue 14 item 1): the whole stack as real processes, locust's
LIS users submitting and polling, the segmentation service SIGKILLed for 12 s (far longer than
the gateway's call retries) and restarted; every case still ends `succeeded`."""

from __future__ import annotations

import pytest

from loadtests.run import main


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_gateway_scenario_survives_a_segmentation_outage(tmp_path):
    report = main(
        [
            "--quick",
            "--scenarios",
            "gateway",
            "--duration",
            "36",
            "--outage",
            "12",
            "--gateway-users",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    outage = report["outage"]
    assert outage["down_s"] >= 12, outage
    rows = report["results"]["gateway"]
    failures = {r["name"]: r["failures"] for r in rows if r["failures"]}
    assert not failures, failures
    assert rows[-1]["name"] == "Aggregated" and rows[-1]["requests"] > 0
    # whole cases finished, not only submits
    assert any(r["name"].startswith("case:") for r in rows), [r["name"] for r in rows]
    assert (tmp_path / "out" / "loadtest.json").exists()
    # every analysis the users submitted ended succeeded, including those in flight while
    # the service was down (locust stops users mid-case, so count from the job store)
    analyses = outage["analyses"]
    assert analyses["statuses"] == {"succeeded": analyses["total"]}, analyses
    assert analyses["during_outage"].get("succeeded", 0) >= 2, analyses
