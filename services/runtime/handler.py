"""The model handler every MarrowScope model service implements (no gRPC in here).

Lifecycle (KServe ``BaseKServeModel`` shape): the runtime builds a handler, sets ``name``
and ``version``, calls ``load()`` then ``warmup()`` in a worker thread, serves it once both
returned, and calls ``stop()`` after the version was replaced (or on shutdown) and its
in-flight requests finished. All methods are synchronous and run in the handler's own
single worker thread, so a handler never sees two calls at once.

One request (or one dynamic batch) runs ``postprocess(predict(preprocess(inputs, params)),
params)``:

- ``inputs``: ``dict[str, np.ndarray]`` already validated against ``inputs`` specs
  (name, datatype, rank, fixed dimensions). BYTES tensors are ``np.ndarray`` of dtype
  ``object`` holding ``bytes``.
- ``params``: request parameters, ``dict[str, bool | int | float | str]``.
- returns ``dict[str, np.ndarray]`` keyed by output names declared in ``outputs``; each
  array's dtype must match the spec datatype (BYTES: object array of ``bytes``/``str``).

When ``batchable`` is true the runtime concatenates same-shaped requests along axis 0
(see ``batching.py``) and splits every output whose spec has ``batch_axis=True`` back per
request; outputs with ``batch_axis=False`` (e.g. class names) are copied to each request.

Stopping early: the runtime cannot interrupt a thread inside a C call (a forward pass), so
a handler whose requests can run long calls ``self.cancellation.check()`` between chunks of
work; it raises ``RequestCancelled`` once the caller cancelled, its deadline passed, or the
service is shutting down. A request cancelled while it waited for the thread never starts.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from marrowscope.errors import InvalidInput, ModelNotReady

Parameters = dict[str, bool | int | float | str]
Tensors = dict[str, np.ndarray]

# OIP datatype <-> numpy dtype. BF16 has no numpy dtype and is not supported.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


class RequestCancelled(Exception):
    """A request stopped before it finished: ``reason`` is ``deadline`` (the caller's
    deadline passed) or ``cancelled`` (the caller went away or the service is stopping)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request stopped: {reason}")
        self.reason = reason


class Cancellation:
    """Whether a running request should stop: set by the runtime, polled by the handler.

    ``deadline`` is a ``time.monotonic()`` instant (None = none). Thread-safe: the event
    loop cancels, the model thread checks.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def reason(self) -> str | None:
        """``cancelled``, ``deadline`` or None while the request should go on."""
        if self._cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None

    def check(self) -> None:
        """Raise RequestCancelled when the request should stop (call between chunks)."""
        reason = self.reason
        if reason is not None:
            raise RequestCancelled(reason)

    @staticmethod
    def all_of(parts: Iterable[Cancellation]) -> Cancellation:
        """One batch serves several requests: it stops only when every one of them has."""
        return _AllOf(list(parts))


class _AllOf(Cancellation):
    def __init__(self, parts: list[Cancellation]) -> None:
        super().__init__()
        self._parts = parts

    @property
    def reason(self) -> str | None:
        if self._cancelled.is_set():
            return "cancelled"
        reasons = {p.reason for p in self._parts}
        if None in reasons or not reasons:
            return None
        return "deadline" if reasons == {"deadline"} else "cancelled"


NEVER_CANCELLED = Cancellation()
"""The token of calls no client waits on (warm-up) and of direct ``infer`` calls."""


class FairTurns:
    """The device, shared in turns by the requests a handler serves at once
    (``max_concurrency`` > 1): one holder at a time, granted first come first served, so
    between two chunks of a long request every request already waiting gets one chunk. A
    one-cell explanation then waits for one chunk of a 500-cell one, not for all of it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()
        self._held = False

    @contextlib.contextmanager
    def turn(self, cancellation: Cancellation = NEVER_CANCELLED) -> Iterator[None]:
        """Hold the device for one chunk; RequestCancelled while waiting when the request
        should stop."""
        me = object()
        with self._cond:
            self._waiting.append(me)
            try:
                while self._held or self._waiting[0] is not me:
                    self._cond.wait(0.05)  # wakes to notice a cancellation
                    cancellation.check()
            except RequestCancelled:
                self._waiting.remove(me)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of a numpy array (object and bytes/str arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPE_TO_NUMPY.items():
        if dtype == array.dtype:
            return name
    raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True)
class TensorSpec:
    """Name, OIP datatype and shape of one input or output; ``-1`` is a variable dimension.

    ``optional`` inputs may be left out of a request. ``batch_axis`` (batchable handlers only)
    says that dimension 0 indexes requests, so outputs are split back per request along it.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    batch_axis: bool = True

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPE_TO_NUMPY:
            raise ValueError(f"{self.name}: unsupported datatype {self.datatype!r}")
        if any(d < -1 for d in self.shape):
            raise ValueError(f"{self.name}: dimensions must be >= -1, got {self.shape}")

    def check(self, array: np.ndarray) -> None:
        """Raise InvalidInput unless ``array`` has this spec's datatype, rank and fixed dims."""
        got = datatype_of(array)
        if got != self.datatype:
            raise InvalidInput(f"input {self.name}: expected datatype {self.datatype}, got {got}")
        if len(array.shape) != len(self.shape) or any(
            want not in (-1, have) for want, have in zip(self.shape, array.shape, strict=True)
        ):
            raise InvalidInput(
                f"input {self.name}: expected shape {list(self.shape)} (-1 = any), "
                f"got {list(array.shape)}"
            )


class ModelHandler:
    """Base class of a served model. Subclass, set the class attributes, override methods.

    Class attributes: ``inputs``/``outputs`` (TensorSpec tuples), ``batchable``,
    ``platform`` (free text for ModelMetadata, e.g. ``"pytorch"``). ``name`` and ``version``
    are set by the runtime before ``load()``.
    """

    inputs: ClassVar[tuple[TensorSpec, ...]] = ()
    outputs: tuple[TensorSpec, ...] = ()
    """Set on the class; a handler whose outputs depend on the loaded version may set them
    per instance in ``__init__`` (the ensemble: one output per target of its config)."""
    batchable: ClassVar[bool] = False
    platform: ClassVar[str] = "python"
    max_concurrency: int = 1
    """Model calls run at once: requests, or batches of a batchable handler. Above 1 the
    handler runs in that many threads and must be thread-safe (no per-call state on the
    instance; a handler that needs the device in turns shares it with ``FairTurns``);
    ``cancellation`` is then per thread. Predictor handlers take it from the service's
    ``model_threads`` setting (`services.common.model_threads`)."""

    name: str = ""
    version: str = ""
    response_parameters: Mapping[str, str] = MappingProxyType({})
    """String parameters copied into every response of this version (e.g. the ensemble's
    lineage, which the gateway checks against the versions it pinned)."""
    provenance_parameters: Mapping[str, str] = MappingProxyType({})
    """What the version was trained on and which outputs it withholds
    (`marrowscope.provenance`), copied into every response beside `response_parameters`."""
    _ready: bool = False
    _calls = threading.local()  # per thread: the request that thread is serving

    @property
    def cancellation(self) -> Cancellation:
        """The token of the request (or batch) this thread serves now (module docstring)."""
        return getattr(self._calls, "cancellation", NEVER_CANCELLED)

    @property
    def ready(self) -> bool:
        """True between a successful ``load()`` and ``stop()``."""
        return self._ready

    def load(self) -> None:
        """Read weights and move them to the device. Override and call ``super().load()``."""
        self._ready = True

    def warmup(self) -> None:
        """Run representative inputs once (kernel selection, allocator); default: nothing."""

    def preprocess(self, inputs: Tensors, parameters: Parameters) -> Any:
        """Turn validated request tensors into model input; default: pass through."""
        return inputs

    def predict(self, batch: Any) -> Any:
        """Run the model. Must be overridden."""
        raise NotImplementedError

    def postprocess(self, outputs: Any, parameters: Parameters) -> Tensors:
        """Turn model output into ``{output name: np.ndarray}``; default: pass through."""
        tensors: Tensors = outputs  # ``infer`` checks the names and dtypes either way
        return tensors

    def stop(self) -> None:
        """Release the model (GPU memory, files). Override and call ``super().stop()``."""
        self._ready = False

    # -- used by the runtime -------------------------------------------------------------
    def validate(self, inputs: Tensors) -> None:
        """Raise InvalidInput for unknown, missing or mis-typed/mis-shaped inputs."""
        specs = {s.name: s for s in self.inputs}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown}; expected {sorted(specs)}")
        missing = sorted(n for n, s in specs.items() if not s.optional and n not in inputs)
        if missing:
            raise InvalidInput(f"missing input(s) {missing}")
        for name, array in inputs.items():
            specs[name].check(array)

    def infer(
        self,
        inputs: Tensors,
        parameters: Parameters,
        cancellation: Cancellation = NEVER_CANCELLED,
    ) -> Tensors:
        """One full pass; checks the outputs against ``outputs`` so handler bugs surface.

        A request whose ``cancellation`` already fired (it waited for the thread past its
        deadline, or its caller left) is not started.
        """
        if not self.ready:
            raise ModelNotReady(f"model {self.name} version {self.version} is not loaded")
        cancellation.check()
        self._calls.cancellation = cancellation
        try:
            result = self.postprocess(self.predict(self.preprocess(inputs, parameters)), parameters)
        finally:
            self._calls.cancellation = NEVER_CANCELLED
        specs = {s.name: s for s in self.outputs}
        for key, array in result.items():
            if key not in specs:
                raise TypeError(f"{type(self).__name__} returned undeclared output {key!r}")
            if not isinstance(array, np.ndarray) or datatype_of(array) != specs[key].datatype:
                raise TypeError(
                    f"{type(self).__name__} output {key!r} must be a numpy {specs[key].datatype}"
                    f" array, got {type(array).__name__} {getattr(array, 'dtype', '')}"
                )
        return result
