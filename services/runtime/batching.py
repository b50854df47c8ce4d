"""Run one loaded handler in its model threads, with dynamic batching when allowed.

``ModelWorker.submit(inputs, parameters)`` returns the handler's outputs for that request.
For a handler with ``batchable = True`` requests wait up to ``max_queue_delay_s`` (or until
``max_batch_size`` rows are collected) and requests that agree on input names, dtypes,
shapes apart from dimension 0 and on every parameter run as one ``infer`` call on inputs
concatenated along axis 0; outputs are sliced back per request. Requests that do not match
the first request of a batch wait for a later batch, in arrival order. Other handlers run
one request per call. ``handler.max_concurrency`` calls (batches or requests) run at once,
each in its own thread: one by default, more on a CPU whose cores intra-op threads alone
would leave idle (`services.common.model_threads`).

The thread is a daemon thread of our own (``ModelThread``), not a ``ThreadPoolExecutor``
one: Python joins executor threads at exit, so a forward pass that is still running when
the shutdown grace period ends would keep the process alive until it finished. A busy model
thread is abandoned instead (``ModelWorker.close(timeout_s)``) and the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, TypeVarTuple

import numpy as np

from services.runtime.handler import (
    NEVER_CANCELLED,
    Cancellation,
    ModelHandler,
    Parameters,
    Tensors,
)

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")
# one queued call of a ModelThread: (its future, fn, args, kwargs); None ends a thread
_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]

_LIVE_THREADS: weakref.WeakSet[ModelThread] = weakref.WeakSet()


class ModelThread(Executor):
    """An executor of daemon threads (one by default) that never blocks interpreter exit.

    Used for model work and as the event loop's default executor in a service process
    (registry resolves and downloads), so that SIGTERM can end the process within its grace
    period whatever a thread is doing.
    """

    def __init__(self, name: str, max_workers: int = 1) -> None:
        self.name = name
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._running = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max_workers)
        ]
        for t in self._threads:
            t.start()
        _LIVE_THREADS.add(self)

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self.name}: cannot schedule work after shutdown")
            self._work.put((future, fn, args, kwargs))
        return future

    @property
    def busy(self) -> bool:
        """True while a call runs in one of the threads."""
        return self._running > 0

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
        if wait:
            self.join(None)

    def join(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for the threads to end (after ``shutdown``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            del item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running += 1
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1
                del future, fn, args, kwargs  # no references to tensors between calls


def busy_threads() -> list[str]:
    """Names of ``ModelThread`` executors with a call still running (checked at exit)."""
    return [t.name for t in list(_LIVE_THREADS) if t.busy]


@dataclass
class InferResult:
    """Outputs of one request plus where its time went (seconds)."""

    outputs: Tensors
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass
class _Pending:
    inputs: Tensors
    parameters: Parameters
    rows: int
    key: Hashable
    future: asyncio.Future[InferResult] = field(repr=False)
    enqueued: float = 0.0
    cancellation: Cancellation = NEVER_CANCELLED


def _batch_key(inputs: Tensors, parameters: Parameters) -> tuple[Hashable, int] | None:
    """(key, rows) of a request, or None when it cannot share a batch (no common dim 0)."""
    dims: set[int | None] = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(dims) != 1:
        return None
    (rows,) = dims
    if rows is None:
        return None
    key = (
        tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())),
        tuple(sorted(parameters.items())),
    )
    return key, rows


class ModelWorker:
    """Owns one handler's thread and (optionally) its batching queue."""

    def __init__(
        self,
        handler: ModelHandler,
        *,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch
        self.threads = max(1, handler.max_concurrency)
        self._executor = ModelThread(f"model-{handler.name}-{handler.version}", self.threads)
        self._slots = asyncio.Semaphore(self.threads)  # batches in flight at once
        self._running: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._backlog: collections.deque[_Pending] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """Run ``fn(*args)`` in the handler's thread (load, warmup, stop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(
        self,
        inputs: Tensors,
        parameters: Parameters,
        cancellation: Cancellation = NEVER_CANCELLED,
    ) -> InferResult:
        """Infer one request; raises whatever the handler raised (``RequestCancelled`` when
        ``cancellation`` fired before or while it ran)."""
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        keyed = _batch_key(inputs, parameters) if self.handler.batchable else None
        if keyed is None or self.max_batch_size == 1:
            outputs, started, finished = await self.call(
                self._timed_infer, inputs, parameters, cancellation
            )
            self._observe_batch(1)
            return InferResult(outputs, started - enqueued, finished - started, 1)
        pending = _Pending(
            inputs, parameters, keyed[1], keyed[0], loop.create_future(), enqueued, cancellation
        )
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.handler.name}")
        await self._queue.put(pending)
        return await pending.future

    async def close(self, timeout_s: float | None = None) -> bool:
        """Stop the batching task and the thread (after callers stopped submitting); work
        not started is dropped. Waits up to ``timeout_s`` for a running call, then leaves
        the (daemon) thread to finish on its own; returns whether the thread ended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)
        if timeout_s is not None and timeout_s <= 0:
            return not self._executor.busy
        # join in a throw-away daemon thread: the loop's executor may itself be shut down
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def join() -> None:
            ended = self._executor.join(timeout_s)

            def report() -> None:
                if not done.done():
                    done.set_result(ended)

            loop.call_soon_threadsafe(report)

        threading.Thread(target=join, name="join-model-thread", daemon=True).start()
        ended = await done
        if not ended:
            log.warning(
                "%s version %s: model thread still busy after %.1f s; leaving it",
                self.handler.name,
                self.handler.version,
                timeout_s,
            )
        return ended

    @property
    def busy(self) -> bool:
        """True while the handler's thread runs a call."""
        return self._executor.busy

    # -- internals -----------------------------------------------------------------------
    def _timed_infer(
        self, inputs: Tensors, parameters: Parameters, cancellation: Cancellation
    ) -> tuple[Tensors, float, float]:
        started = time.perf_counter()
        outputs = self.handler.infer(inputs, parameters, cancellation)
        return outputs, started, time.perf_counter()

    def _observe_batch(self, size: int) -> None:
        if self._on_batch is not None:
            self._on_batch(size)

    async def _next(self, timeout: float) -> _Pending | None:
        """The next queued request, or None when none arrives within ``timeout`` seconds."""
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Pending]:
        first = self._backlog.popleft() if self._backlog else await self._queue.get()
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_queue_delay_s
        # Matching requests already waiting in the backlog join first, in arrival order.
        for waiting in list(self._backlog):
            if (
                len(batch) < self.max_batch_size
                and waiting.key == first.key
                and rows + waiting.rows <= self.max_batch_size
            ):
                self._backlog.remove(waiting)
                batch.append(waiting)
                rows += waiting.rows
        while len(batch) < self.max_batch_size and rows < self.max_batch_size:
            item = await self._next(deadline - time.perf_counter())
            if item is None:
                break
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                self._backlog.append(item)
        return [p for p in batch if not p.future.done()]  # drop requests cancelled meanwhile

    async def _loop(self) -> None:
        # A batch is collected only once a thread is free for it, so a batch never waits
        # half-full behind a running one while later requests could still have joined it.
        try:
            while True:
                await self._slots.acquire()
                try:
                    batch = await self._collect()
                except BaseException:
                    self._slots.release()
                    raise
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._guarded(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()

    async def _guarded(self, batch: list[_Pending]) -> None:
        try:
            await self._run_batch(batch)
        except Exception as exc:  # handed to every caller in the batch; the loop goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            self._slots.release()

    async def _run_batch(self, batch: list[_Pending]) -> None:
        names = list(batch[0].inputs)
        merged = (
            batch[0].inputs
            if len(batch) == 1
            else {n: np.concatenate([p.inputs[n] for p in batch], axis=0) for n in names}
        )
        cancellation = (
            batch[0].cancellation
            if len(batch) == 1
            else Cancellation.all_of(p.cancellation for p in batch)
        )
        outputs, started, finished = await self.call(
            self._timed_infer, merged, batch[0].parameters, cancellation
        )
        self._observe_batch(len(batch))
        specs = {s.name: s for s in self.handler.outputs}
        total = sum(p.rows for p in batch)
        offset = 0
        for p in batch:
            mine: Tensors = {}
            for name, array in outputs.items():
                if specs[name].batch_axis:
                    if array.ndim == 0 or array.shape[0] != total:
                        raise RuntimeError(
                            f"{type(self.handler).__name__} output {name} has shape "
                            f"{list(array.shape)}, expected dimension 0 = batch rows {total}"
                        )
                    mine[name] = array[offset : offset + p.rows]
                else:
                    mine[name] = array
            offset += p.rows
            if not p.future.done():
                p.future.set_result(
                    InferResult(mine, started - p.enqueued, finished - started, len(batch))
                )
