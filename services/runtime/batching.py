"""Run one loaded handler: a single worker thread, with dynamic batching when allowed.

``ModelWorker.submit(inputs, parameters)`` returns the handler's outputs for that request.
For a handler with ``batchable = True`` requests wait up to ``max_queue_delay_s`` (or until
``max_batch_size`` rows are collected) and requests that agree on input names, dtypes,
shapes apart from dimension 0 and on every parameter run as one ``infer`` call on inputs
concatenated along axis 0; outputs are sliced back per request. Requests that do not match
the first request of a batch wait for a later batch, in arrival order. Other handlers run
one request at a time in the same thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.runtime.handler import ModelHandler, Parameters, Tensors

log = logging.getLogger(__name__)


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
    key: Any
    future: asyncio.Future = field(repr=False)
    enqueued: float = 0.0


def _batch_key(inputs: Tensors, parameters: Parameters) -> tuple[Any, int] | None:
    """(key, rows) of a request, or None when it cannot share a batch (no common dim 0)."""
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1 or None in rows:
        return None
    key = (
        tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())),
        tuple(sorted(parameters.items())),
    )
    return key, rows.pop()


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
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{handler.name}-{handler.version}"
        )
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._backlog: collections.deque[_Pending] = collections.deque()
        self._task: asyncio.Task | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the handler's thread (load, warmup, stop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, inputs: Tensors, parameters: Parameters) -> InferResult:
        """Infer one request; raises whatever the handler raised."""
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        keyed = _batch_key(inputs, parameters) if self.handler.batchable else None
        if keyed is None or self.max_batch_size == 1:
            outputs, started, finished = await self.call(self._timed_infer, inputs, parameters)
            self._observe_batch(1)
            return InferResult(outputs, started - enqueued, finished - started, 1)
        pending = _Pending(inputs, parameters, keyed[1], keyed[0], loop.create_future(), enqueued)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.handler.name}")
        await self._queue.put(pending)
        return await pending.future

    async def close(self) -> None:
        """Stop the batching task and the thread (after callers stopped submitting)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._executor.shutdown, True)

    # -- internals -----------------------------------------------------------------------
    def _timed_infer(self, inputs: Tensors, parameters: Parameters) -> tuple[Tensors, float, float]:
        started = time.perf_counter()
        outputs = self.handler.infer(inputs, parameters)
        return outputs, started, time.perf_counter()

    def _observe_batch(self, size: int) -> None:
        if self._on_batch is not None:
            self._on_batch(size)

    async def _next(self, timeout: float | None) -> _Pending | None:
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Pending]:
        first = self._backlog.popleft() if self._backlog else await self._next(None)
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_queue_delay_s
        # Matching requests already waiting in the backlog join first, in arrival order.
        for item in list(self._backlog):
            if (
                len(batch) < self.max_batch_size
                and item.key == first.key
                and rows + item.rows <= self.max_batch_size
            ):
                self._backlog.remove(item)
                batch.append(item)
                rows += item.rows
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
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except Exception as exc:  # handed to every caller in the batch; the loop goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        names = list(batch[0].inputs)
        merged = (
            batch[0].inputs
            if len(batch) == 1
            else {n: np.concatenate([p.inputs[n] for p in batch], axis=0) for n in names}
        )
        outputs, started, finished = await self.call(self._timed_infer, merged, batch[0].parameters)
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
