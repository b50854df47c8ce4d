"""Under CI, a test that needs PostgreSQL, the real data or a browser must not skip.

All three exist on the CI machines (Chromium from Debian's packages through `make sysdeps`,
one apt-get of a stock package), so a skip there means a broken setup, and a green run would
hide that the only tests of two workers sharing the queue, the PostgreSQL migrations, the
shared Optuna study, the real-data floors and the review app in a real browser never ran.
On a developer's machine without them the same tests still skip with their reason.

A test needs a dependency when it carries the marker (`postgres`, `real_data`) or uses the
fixture that provides it (`postgres_url`, `shared_data`, `browser`, directly or through another
fixture). Under `CI` (true/1/yes) such a test's skip is reported as a failure, and the run
ends with a summary of every skip by reason.

`tests/conftest.py` imports these hooks; `tests/test_ci_skips.py` runs them on a tiny suite.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

# marker -> the fixture that provides the dependency
REQUIRED_IN_CI = {"postgres": "postgres_url", "real_data": "shared_data", "browser": "browser"}
MARKERS = {
    "postgres": "needs the PostgreSQL server at 127.0.0.1:5432",
    "real_data": "needs the real data in ../shared/data",
    "browser": "needs Chromium (Debian's chromium, `make sysdeps`) and Playwright",
}


def register_markers(config: pytest.Config) -> None:
    for name, what in MARKERS.items():
        config.addinivalue_line(
            "markers", f"{name}: {what} (skips with the reason when absent; fails under CI=true)"
        )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def required_dependencies(item: pytest.Item) -> list[str]:
    """The markers of `REQUIRED_IN_CI` that `item` carries or earns by its fixtures."""
    fixtures = set(getattr(item, "fixturenames", ()))
    return [
        marker
        for marker, fixture in REQUIRED_IN_CI.items()
        if item.get_closest_marker(marker) is not None or fixture in fixtures
    ]


def _reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the fixtures imply the marker, so `-m postgres` / `-m real_data` select them all
    for item in items:
        for marker in required_dependencies(item):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report: pytest.TestReport = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        needs = required_dependencies(item)
        if needs:
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under CI=true, but it needs {' and '.join(needs)}, which the CI "
                f"machine has: {_reason(report)}"
            )
            report.user_properties.append(("ci_required_skip", _reason(report)))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not in_ci():
        return
    skipped = terminalreporter.stats.get("skipped", [])
    # a refused skip in a fixture or skipif counts as an error, in the test body as a failure
    refused = [
        r
        for key in ("failed", "error")
        for r in terminalreporter.stats.get(key, [])
        if any(name == "ci_required_skip" for name, _ in getattr(r, "user_properties", ()))
    ]
    terminalreporter.section("skip summary (CI)")
    reasons = Counter(_reason(r) for r in skipped)
    terminalreporter.write_line(f"{len(skipped)} skipped, {len(refused)} required skips failed")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"  {n:4d} skipped: {reason}")
    for r in refused:
        value = dict(r.user_properties)["ci_required_skip"]
        terminalreporter.write_line(f"  FAILED (required under CI) {r.nodeid}: {value}")
