"""The OIP locustfile's exit watchdog: once locust fires `quit`, a process whose interpreter
then stalls (grpc under gevent can, after the stats are written) still ends, with locust's
exit code, instead of hanging until the runner's timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imports the locustfile as locust does (gevent patched, grpc's gevent mode on), fires
# `quit` as locust's shutdown does, then blocks the real main thread as a stalled
# finalisation would.
SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import locust  # noqa: F401  (patches the standard library with gevent, as `locust` does)
    from gevent.monkey import get_original
    from locust import events
    import loadtests.locustfile_oip as oip

    oip._EXIT_GRACE_S = 0.5
    events.quit.fire(exit_code=3)
    get_original("time", "sleep")(60)
    sys.exit(0)  # never reached while the watchdog works
    """
)


def test_a_stalled_exit_ends_with_locust_s_exit_code():
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert out.returncode == 3, out.stderr[-2000:]
    assert "forcing exit" in out.stderr
    assert elapsed < 45
