"""Every `python -m` entry point of the project answers `--help` with usage, exit 0, and
touches nothing: `python -m services.gateway --help` had run the migrations, created
`gateway.db` and bound its port, and `services.gateway.worker --help` started a worker.

The entry points are found by scanning (a `__main__.py`, or a module with an
`if __name__ == "__main__":` block) so a new one is checked without an edit here. All run at
once in one fixture, each in its own empty working directory, so the whole check costs about
as long as the slowest import (torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from marrowscope.paths import PROJECT_ROOT

PACKAGES = ("services", "training", "tools", "bench", "loadtests")
_MAIN_BLOCK = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)


def entry_points(root: Path = PROJECT_ROOT) -> list[str]:
    """Module names runnable with `python -m`, under `PACKAGES`."""
    found = set()
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            rel = path.relative_to(root)
            if "_gen" in rel.parts:  # generated protobuf stubs
                continue
            if path.name == "__main__.py":
                found.add(".".join(rel.parent.parts))
            elif _MAIN_BLOCK.search(path.read_text(encoding="utf-8")):
                found.add(".".join(rel.with_suffix("").parts))
    return sorted(found)


MODULES = entry_points()


def _help(module: str, cwd: Path) -> tuple[int, str, list[str]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MS_")},
        "PYTHONPATH": str(PROJECT_ROOT),
        "OMP_NUM_THREADS": "1",
        "HOME": str(cwd),  # a tool that writes under ~ would show up here too
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,  # generous: a --help that serves instead never returns
            check=False,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, f"{module} --help did not return: it serves or works instead"
    created = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    return code, output, created


@pytest.fixture(scope="module")
def helped(tmp_path_factory) -> dict[str, tuple[int, str, list[str]]]:
    dirs = {m: tmp_path_factory.mktemp(m.replace(".", "_")) for m in MODULES}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda m: _help(m, dirs[m]), MODULES)
        return dict(zip(MODULES, results, strict=True))


def test_the_scan_finds_the_known_entry_points():
    for known in ("services.gateway", "services.gateway.worker", "services.segmentation"):
        assert known in MODULES
    assert len(MODULES) >= 25


@pytest.mark.parametrize("module", MODULES)
def test_help_prints_usage_and_touches_nothing(helped, module):
    code, output, created = helped[module]
    assert code == 0, output[-2000:]
    assert "usage:" in output.lower(), output[-2000:]
    assert created == [], f"{module} --help created {created}"


def test_gateway_help_lists_its_settings_with_their_meaning(helped):
    for module in ("services.gateway", "services.gateway.worker"):
        _, output, _ = helped[module]
        assert "MS_GATEWAY_MAX_CELL_IMAGES  int  (default: 2000)" in output
        assert "X-Forwarded-For" in output  # MS_GATEWAY_TRUSTED_PROXIES's description
