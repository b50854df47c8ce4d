"""Loaded model versions of one model, hot reload, and version routing.

A ``resolver`` (a synchronous callable, run in a thread) says which version is wanted now
and how to build a handler for it; real services pass one built on
``marrowscope.registry.resolve`` (see ``server.registry_resolver``). The repository loads
and warms the wanted version, serves it, and every ``poll_interval_s`` asks again. On a
change it loads the new version beside the old one, warms it, and swaps atomically: new
requests without a version go to the new one. The old version stays addressable by name for
``version_grace_s``, then is removed, drained (its in-flight requests finish) and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from marrowscope.errors import ModelNotFound, ModelNotReady
from services.runtime.batching import ModelThread, ModelWorker
from services.runtime.handler import ModelHandler
from services.runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedVersion:
    """The wanted version id and a callable that builds (not loads) its handler."""

    version: str
    build: Callable[[], ModelHandler]


Resolver = Callable[[], ResolvedVersion]


@dataclass(eq=False)
class LoadedVersion:
    """One loaded, warmed-up version and its worker; ``inflight`` counts current calls."""

    version: str
    handler: ModelHandler
    worker: ModelWorker
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    retire_task: asyncio.Task[None] | None = None
    unload_task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.idle.set()


class ModelRepository:
    """The versions of one model name that this service holds."""

    def __init__(
        self,
        name: str,
        *,
        metrics: RuntimeMetrics | None = None,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        version_grace_s: float = 30.0,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics or RuntimeMetrics()
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.version_grace_s = version_grace_s
        self._on_change = on_change
        self._loaded: dict[str, LoadedVersion] = {}
        self._current: LoadedVersion | None = None
        self._lock = asyncio.Lock()
        self._poll_task: asyncio.Task[None] | None = None
        self._retiring: set[LoadedVersion] = set()
        self._closing = False
        # registry calls and downloads: a daemon thread, so a hung one cannot delay exit
        self._io = ModelThread(f"registry-{name}")

    # -- state ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._current is not None and not self._closing

    @property
    def current_version(self) -> str | None:
        return None if self._current is None else self._current.version

    @property
    def versions(self) -> list[str]:
        """Loaded versions, the current one first."""
        cur = self.current_version
        return ([cur] if cur else []) + sorted(v for v in self._loaded if v != cur)

    def get(self, version: str | None = None) -> LoadedVersion:
        """The current version (``version`` empty/None) or the named loaded one.

        Raises ModelNotReady before the first load or while shutting down, ModelNotFound
        for a version that is not loaded (the message lists the loaded ones).
        """
        if self._closing:
            raise ModelNotReady(f"model {self.name} is shutting down")
        if not version:
            if self._current is None:
                raise ModelNotReady(f"model {self.name} is not loaded yet")
            return self._current
        entry = self._loaded.get(version)
        if entry is None:
            raise ModelNotFound(
                f"model {self.name} has no loaded version {version!r}; loaded: {self.versions}"
            )
        return entry

    @contextlib.asynccontextmanager
    async def acquire(self, version: str | None = None) -> AsyncIterator[LoadedVersion]:
        """Hold a version for one request; it is not stopped before the request leaves."""
        entry = self.get(version)  # lookup and count happen without an await in between
        entry.inflight += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.inflight -= 1
            if entry.inflight == 0:
                entry.idle.set()

    # -- loading -------------------------------------------------------------------------
    async def load_local(self, handler: ModelHandler, version: str) -> None:
        """Load, warm and serve a fixed handler (no resolver, no polling)."""
        async with self._lock:
            await self._activate(await self._load(version, handler))

    async def start(self, resolver: Resolver, poll_interval_s: float) -> None:
        """Load the wanted version (errors propagate), then poll when the interval is > 0."""
        await self.refresh(resolver)
        if poll_interval_s > 0:
            self._poll_task = asyncio.create_task(
                self._poll(resolver, poll_interval_s), name=f"poll-{self.name}"
            )

    async def refresh(self, resolver: Resolver) -> bool:
        """Ask the resolver once; load and swap when the wanted version changed."""
        loop = asyncio.get_running_loop()
        resolved = await loop.run_in_executor(self._io, resolver)
        async with self._lock:
            if self._closing or resolved.version == self.current_version:
                return False
            entry = self._loaded.get(resolved.version)
            if entry is None:  # not a version still in its grace period
                log.info("loading %s version %s", self.name, resolved.version)
                handler = await loop.run_in_executor(self._io, resolved.build)
                entry = await self._load(resolved.version, handler)
            await self._activate(entry)
            return True

    async def _load(self, version: str, handler: ModelHandler) -> LoadedVersion:
        handler.name, handler.version = self.name, version
        metrics, name = self.metrics, self.name
        worker = ModelWorker(
            handler,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_s,
            on_batch=lambda n: metrics.batch_size.labels(name, version).observe(n),
        )
        try:
            await worker.call(handler.load)
            await worker.call(handler.warmup)
        except BaseException:
            # a failed load or a shutdown during load/warm-up: do not wait for the thread
            await worker.close(timeout_s=0)
            raise
        return LoadedVersion(version, handler, worker)

    async def _activate(self, entry: LoadedVersion) -> None:
        if entry.retire_task is not None:  # switched back to a version in its grace period
            entry.retire_task.cancel()
            entry.retire_task = None
            self._retiring.discard(entry)
        previous, self._current = self._current, entry
        self._loaded[entry.version] = entry
        self.metrics.set_loaded(self.name, entry.version, True)
        log.info(
            "serving %s version %s",
            self.name,
            entry.version,
            extra={"previous_version": previous.version if previous else None},
        )
        if previous is not None and previous is not entry:
            self._retiring.add(previous)
            previous.retire_task = asyncio.create_task(
                self._retire(previous, self.version_grace_s), name=f"retire-{previous.version}"
            )
        if self._on_change is not None:
            await self._on_change()

    async def _retire(self, entry: LoadedVersion, after_s: float) -> None:
        await asyncio.sleep(after_s)
        if self._loaded.get(entry.version) is entry and entry is not self._current:
            del self._loaded[entry.version]
            self.metrics.set_loaded(self.name, entry.version, False)
        # shielded: cancelling the retirement (close) must not interrupt a half-done stop
        await asyncio.shield(self._unload(entry, timeout=None))
        self._retiring.discard(entry)

    def _unload(
        self, entry: LoadedVersion, timeout: float | None, exiting: bool = False
    ) -> asyncio.Task[None]:
        """The (single) task that drains and stops ``entry``."""
        if entry.unload_task is None:
            entry.unload_task = asyncio.create_task(
                self._drain_and_stop(entry, timeout, exiting), name=f"unload-{entry.version}"
            )
        return entry.unload_task

    async def _drain_and_stop(
        self, entry: LoadedVersion, timeout: float | None, exiting: bool = False
    ) -> None:
        """Wait for in-flight requests, ``stop()`` the handler and end its thread, all within
        ``timeout`` (None = as long as it takes): at shutdown the grace period bounds it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        try:
            await asyncio.wait_for(entry.idle.wait(), left())
        except TimeoutError:
            log.warning(
                "%s version %s: %d request(s) still running at stop",
                self.name,
                entry.version,
                entry.inflight,
            )
        try:
            # queued behind a forward pass that outlives the grace period: then skip stop()
            if not exiting:
                await asyncio.wait_for(entry.worker.call(entry.handler.stop), left())
        except TimeoutError:
            log.warning(
                "%s version %s: model thread busy, stop() skipped", self.name, entry.version
            )
        except Exception:  # the version is gone either way; keep stopping the others
            log.exception("%s version %s: stop() failed", self.name, entry.version)
        await entry.worker.close(0 if exiting else left())
        log.info("stopped %s version %s", self.name, entry.version)

    async def _poll(self, resolver: Resolver, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh(resolver)
            except Exception:  # a registry hiccup must not stop serving the loaded version
                log.exception(
                    "refreshing %s failed; still serving %s", self.name, self.current_version
                )

    async def close(self, timeout_s: float = 10.0, *, exiting: bool = False) -> None:
        """Stop polling, refuse new requests, drain and stop every loaded version.

        ``exiting`` (the process ends next) skips ``handler.stop()`` and does not wait for
        model threads once their requests are gone: exiting frees the model anyway, a
        cancelled forward pass has no one to answer, and releasing memory (``gc.collect``)
        can hold the GIL, and so the event loop, past the grace period.
        """
        self._closing = True
        entries = list({*self._loaded.values(), *self._retiring})
        tasks = [t for t in [self._poll_task, *(e.retire_task for e in entries)] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loaded.clear()
        self._retiring.clear()
        self._current = None
        for entry in entries:
            self.metrics.set_loaded(self.name, entry.version, False)
        await asyncio.gather(*(self._unload(e, timeout_s, exiting) for e in entries))
        self._io.shutdown(wait=False, cancel_futures=True)
