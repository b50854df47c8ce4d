"""`loadtests.summary` and `run_locust`: the final statistics survive a locust process that
stalls on its way out (gRPC under gevent stalled interpreter finalisation in CI twice)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from loadtests.run import run_locust

# A locustfile whose users record fake requests, and whose interpreter never finishes
# exiting: an atexit handler that sleeps (atexit runs in finalisation, like the gRPC stall).
LOCUSTFILE = """
import atexit
import time

from locust import User, constant, events, task

from loadtests import summary

summary.install(events, hard_exit={hard_exit})
atexit.register(time.sleep, 3600)


class FakeUser(User):
    wait_time = constant(0.05)

    @task
    def call(self):
        with self.environment.events.request.measure("fake", "echo"):
            time.sleep(0.01)
"""


def _run(tmp_path, *, hard_exit: bool, grace_s: float) -> list[dict]:
    locustfile = tmp_path / "locustfile_stall.py"
    locustfile.write_text(textwrap.dedent(LOCUSTFILE.format(hard_exit=hard_exit)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return run_locust(
        locustfile,
        users=2,
        duration_s=2,
        env=env,
        prefix=tmp_path / "stall",
        exit_grace_s=grace_s,
    )


def _check(rows: list[dict]) -> None:
    assert [r["name"] for r in rows] == ["echo", "Aggregated"]
    echo = rows[0]
    assert echo["type"] == "fake" and echo["requests"] > 5 and echo["failures"] == 0
    assert echo["p50_ms"] is not None and echo["p50_ms"] >= 10
    assert rows[-1]["requests"] == echo["requests"]


@pytest.mark.timeout(300)
def test_hard_exit_ends_the_process_before_finalisation(tmp_path, caplog):
    # the process exits by itself (os._exit in the quit listener; the stalling atexit
    # handler never runs), so run_locust does not have to kill it
    rows = _run(tmp_path, hard_exit=True, grace_s=200)
    _check(rows)
    assert "did not exit" not in caplog.text


@pytest.mark.timeout(300)
def test_a_stalled_exit_is_killed_and_its_summary_kept(tmp_path, caplog):
    rows = _run(tmp_path, hard_exit=False, grace_s=5)
    _check(rows)
    assert "did not exit; killed" in caplog.text


@pytest.mark.timeout(300)
def test_no_summary_is_an_error_with_locust_output(tmp_path):
    locustfile = tmp_path / "locustfile_broken.py"
    locustfile.write_text("raise RuntimeError('broken locustfile 42')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with pytest.raises(RuntimeError, match="broken locustfile 42"):
        run_locust(locustfile, users=1, duration_s=1, env=env, prefix=tmp_path / "b")
