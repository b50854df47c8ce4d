"""`tests/ci_skips.py` on a tiny suite in a pytest subprocess: under CI=true a skip of a test
that needs PostgreSQL or the real data fails the run (whether the fixture, a skipif or the
test body skips), other skips stay skips, and the run ends with the skip summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from marrowscope.paths import PROJECT_ROOT
from tests.ci_skips import in_ci

CONFTEST = """
import pytest
from tests.ci_skips import (
    pytest_collection_modifyitems, pytest_runtest_makereport, pytest_terminal_summary,
    register_markers as pytest_configure,
)

@pytest.fixture(scope="session")
def postgres_url():
    pytest.skip("PostgreSQL is not reachable (test)")

@pytest.fixture
def shared_data():
    pytest.skip("real data folder is absent (test)")

@pytest.fixture
def cohort(shared_data):  # needs the real data through another fixture
    return shared_data
"""

TESTS = """
import pytest

def test_db(postgres_url):
    pass

def test_cohort(cohort):
    pass

@pytest.mark.real_data
@pytest.mark.skipif(True, reason="overviews absent (test)")
def test_marked_skipif():
    pass

@pytest.mark.real_data
def test_marked_body_skip():
    pytest.skip("deepapl absent (test)")

def test_optional_tool():
    pytest.skip("kubectl is not installed (test)")

@pytest.mark.real_data
@pytest.mark.xfail(reason="known (test)")
def test_expected_failure():
    raise AssertionError  # an expected failure is reported as a skip: it stays xfailed

def test_plain():
    pass
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_tiny.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the installed plugins only slow it down
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_outside_ci_the_dependencies_skip_with_their_reason(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 5 skipped, 1 xfailed" in res.stdout
    assert "PostgreSQL is not reachable (test)" in res.stdout
    assert "skip summary (CI)" not in res.stdout


def test_under_ci_a_needed_dependency_that_skips_fails_the_run(tmp_path):
    res = _run(tmp_path, "true")
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    # fixture and skipif skips are setup errors, a skip in the test body a failure
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 3 errors" in out, out
    for name in ("test_db", "test_cohort", "test_marked_skipif", "test_marked_body_skip"):
        assert f"FAILED (required under CI) test_tiny.py::{name}" in out, out
    assert "it needs postgres, which the CI machine has" in out
    assert "it needs real_data, which the CI machine has: overviews absent (test)" in out
    # an optional tool's skip stays a skip and is listed in the summary with its count
    assert "skip summary (CI)" in out and "1 skipped, 4 required skips failed" in out
    assert "   1 skipped: kubectl is not installed (test)" in out


def test_ci_values(monkeypatch):
    for value, ci in (("true", True), ("1", True), ("YES", True), ("false", False), ("", False)):
        monkeypatch.setenv("CI", value)
        assert in_ci() is ci, value
    monkeypatch.delenv("CI")
    assert not in_ci()
