"""Shared fixtures: keep torch on one thread (CI has 2 cores), locate real data."""

from __future__ import annotations

import os
import socket

import pytest

from marrowscope.paths import shared_data_dir
from tests.ci_skips import (  # noqa: F401 - hooks: a needed PostgreSQL/real data must not skip in CI
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
    pytest_terminal_summary,
    register_markers,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    register_markers(config)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # torch-free subsets of the suite still run
        pass


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (see ../shared/data/README.md)")
    return path


def free_port() -> int:
    """`services.stack.free_port`: one allocator for the tests and the stack, so no two
    callers in this process get the same port."""
    from services.stack import free_port as allocate

    return allocate()


@pytest.fixture
def port_factory():
    return free_port


POSTGRES_URL = os.environ.get("MARROWSCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url():
    """URL of the real PostgreSQL test database; skips with a reason when unreachable."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    return POSTGRES_URL


@pytest.fixture(scope="module", autouse=True)
def _no_event_loop_left_running():
    """After each module (its fixtures torn down first): no asyncio loop may still count as
    running in the main thread. A session-scoped Playwright did exactly that, and every later
    `asyncio.run` in the session failed ("cannot be called from a running event loop")."""
    yield
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    pytest.fail(f"a test module left an event loop running in the main thread: {loop!r}")
