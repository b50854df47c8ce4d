"""Wake this process's idle job loops when work arrives, instead of waiting for their poll.

A job loop that finds nothing to claim sleeps until the doorbell rings or the poll interval
passes, whichever is first. The API rings it after committing a new analysis (from the
request thread: `ring` is thread-safe), and a job loop rings it when it finishes a job (a
slot is free and a claim that found every slot busy may now succeed). Work created by
another process (a second gateway replica, a standalone worker, the HL7 listener) is still
found by polling, so the doorbell only shortens the wait; it never replaces the queue.

Before the doorbell, the pickup latency of a new analysis was up to one poll interval, and
making that interval short (as the benchmarks did) cost two database transactions per idle
job loop per interval.
"""

from __future__ import annotations

import asyncio
import contextlib


class Doorbell:
    """One per process; `bind` to the event loop the job loops run on."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self) -> None:
        """Attach to the running event loop (call from it, before the job loops start)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def ring(self) -> None:
        """Wake every waiting job loop; from any thread; a no-op before `bind`."""
        loop, event = self._loop, self._event
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between check and call
            loop.call_soon_threadsafe(event.set)

    def clear(self) -> None:
        """Forget earlier rings: call before looking for work, so that a ring arriving after
        the look (and before `wait`) still ends the next wait at once."""
        if self._event is not None:
            self._event.clear()

    async def wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        """Return when rung, when `stop` is set, or after `timeout_s`."""
        waits = {asyncio.ensure_future(stop.wait())}
        if self._event is not None:
            waits.add(asyncio.ensure_future(self._event.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
