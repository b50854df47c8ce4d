"""Open Inference Protocol servicer: protobuf <-> numpy, routing to loaded model versions.

No model code and no status-code mapping here: domain errors (``InvalidInput``,
``ModelNotFound``, ``ModelNotReady``) propagate to ``errors.ErrorInterceptor``.

Tensor encoding (OIP/Triton): raw contents are little-endian, row-major; a BYTES tensor is
the concatenation of its elements, each preceded by its length as a 4-byte little-endian
unsigned int. Decoded BYTES tensors are numpy ``object`` arrays of ``bytes``.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Mapping

import grpc
import numpy as np

from marrowscope.errors import InvalidInput, ModelNotFound
from services.runtime.errors import MessageTooLarge, status_label
from services.runtime.handler import (
    DATATYPE_TO_NUMPY,
    Cancellation,
    Parameters,
    Tensors,
    TensorSpec,
    datatype_of,
)
from services.runtime.metrics import UNKNOWN, RuntimeMetrics
from services.runtime.protocol import pb, pb_grpc
from services.runtime.repository import ModelRepository

# Typed-contents field per datatype; FP16 has none (raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LEN = struct.Struct("<I")


# -- decoding ------------------------------------------------------------------------------
def _bytes_from_raw(buf: bytes, count: int, name: str) -> np.ndarray:
    items: list[bytes] = []
    offset, end = 0, len(buf)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"input {name}: truncated BYTES length prefix at byte {offset}")
        (size,) = _LEN.unpack_from(buf, offset)
        offset += 4
        if offset + size > end:
            raise InvalidInput(f"input {name}: BYTES element {len(items)} overruns the buffer")
        items.append(buf[offset : offset + size])
        offset += size
    if len(items) != count:
        raise InvalidInput(f"input {name}: {len(items)} BYTES elements for a shape of {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _tensor_from_raw(buf: bytes, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_raw(buf, count, name).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise InvalidInput(
            f"input {name}: raw contents hold {len(buf)} bytes, expected {expected} "
            f"for {datatype} {list(shape)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _tensor_from_contents(
    contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], name: str
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name}: {datatype} must be sent as raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name}: {len(values)} values in contents.{field}, expected {count} "
            f"for shape {list(shape)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.asarray(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> Tensors:
    """Request input tensors as numpy arrays; raises InvalidInput for malformed tensors."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; with raw contents "
            "every input needs exactly one"
        )
    tensors: Tensors = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
        if name in tensors:
            raise InvalidInput(f"input {name} appears twice")
        if datatype not in DATATYPE_TO_NUMPY:
            raise InvalidInput(f"input {name}: unsupported datatype {datatype!r}")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {name}: negative dimension in shape {list(shape)}")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name}: both contents and raw_input_contents given")
            tensors[name] = _tensor_from_raw(raw[index], datatype, shape, name)
        else:
            tensors[name] = _tensor_from_contents(tensor.contents, datatype, shape, name)
    return tensors


def decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> Parameters:
    """``{key: bool | int | float | str}``; parameters without a value are left out."""
    out: Parameters = {}
    for key, param in parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


# -- encoding ------------------------------------------------------------------------------
def _element_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, np.bytes_ | np.str_):
        return _element_bytes(item.item())
    raise TypeError(f"BYTES element must be bytes or str, got {type(item).__name__}")


def tensor_to_raw(array: np.ndarray) -> bytes:
    """Raw OIP bytes of a tensor (little-endian; BYTES length-prefixed)."""
    if datatype_of(array) == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = _element_bytes(item)
            parts += (_LEN.pack(len(data)), data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_response(
    request: pb.ModelInferRequest,
    model: str,
    version: str,
    outputs: Tensors,
    parameters: Mapping[str, str] | None = None,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = str(value)
    response.parameters["model_version"].string_param = version
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(tensor_to_raw(array))
    return response


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )


def _requested(request: pb.ModelInferRequest, specs: tuple[TensorSpec, ...]) -> set[str] | None:
    if not request.outputs:
        return None
    names = {o.name for o in request.outputs}
    unknown = sorted(names - {s.name for s in specs})
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; available {[s.name for s in specs]}")
    return names


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over one or more model repositories."""

    def __init__(
        self,
        repositories: Mapping[str, ModelRepository],
        *,
        metrics: RuntimeMetrics,
        server_name: str = "marrowscope",
        server_version: str = "0.1.0",
        max_message_bytes: int | None = None,
    ) -> None:
        self.repositories = dict(repositories)
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.server_name = server_name
        self.server_version = server_version
        self.draining = False

    def _repository(self, name: str) -> ModelRepository:
        repo = self.repositories.get(name)
        if repo is None:
            raise ModelNotFound(f"unknown model {name!r}; served: {sorted(self.repositories)}")
        return repo

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        ready = not self.draining and all(r.ready for r in self.repositories.values())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        repo = self._repository(request.name)
        ready = repo.ready and (not request.version or request.version in repo.versions)
        return pb.ModelReadyResponse(ready=ready and not self.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self.server_name, version=self.server_version, extensions=[]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        repo = self._repository(request.name)
        handler = repo.get(request.version or None).handler
        return pb.ModelMetadataResponse(
            name=repo.name,
            versions=repo.versions,
            platform=handler.platform,
            inputs=[_tensor_metadata(s) for s in handler.inputs],
            outputs=[_tensor_metadata(s) for s in handler.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        known = request.model_name in self.repositories
        model = request.model_name if known else UNKNOWN
        version = UNKNOWN
        error: BaseException | None = None
        m = self.metrics
        remaining = context.time_remaining()
        # the model thread polls this between chunks: caller gone, deadline passed, shutdown
        cancellation = Cancellation(
            None if remaining is None else time.monotonic() + max(0.0, remaining)
        )
        if known:
            m.inflight.labels(model).inc()
        try:
            repo = self._repository(request.model_name)
            inputs = decode_inputs(request)
            parameters = decode_parameters(request.parameters)
            async with repo.acquire(request.model_version or None) as entry:
                version = entry.version
                extra = {
                    **entry.handler.provenance_parameters,
                    **entry.handler.response_parameters,
                }
                entry.handler.validate(inputs)
                wanted = _requested(request, entry.handler.outputs)
                result = await entry.worker.submit(inputs, parameters, cancellation)
            m.queue_seconds.labels(model, version).observe(result.queue_s)
            m.compute_seconds.labels(model, version).observe(result.compute_s)
            outputs = result.outputs
            if wanted is not None:
                outputs = {k: v for k, v in outputs.items() if k in wanted}
            response = encode_response(request, repo.name, version, outputs, extra)
            self._check_reply_size(response)
            return response
        except asyncio.CancelledError as exc:
            cancellation.cancel()
            error = exc
            raise
        except Exception as exc:
            error = exc
            raise
        finally:
            m.requests.labels(model, version, _outcome(error, context)).inc()
            if known:
                m.inflight.labels(model).dec()
                m.request_seconds.labels(model, version).observe(time.perf_counter() - started)

    def _check_reply_size(self, response: pb.ModelInferResponse) -> None:
        """gRPC would refuse a reply over the limit after we returned it, and the client
        would get RESOURCE_EXHAUSTED while we counted ``ok``: refuse it here instead."""
        if self.max_message_bytes is None:
            return
        size = response.ByteSize()
        if size > self.max_message_bytes:
            self.metrics.oversized.labels("sent").inc()
            raise MessageTooLarge(
                f"reply of {size} bytes exceeds the service's max_message_bytes "
                f"({self.max_message_bytes}); request fewer outputs or a smaller input"
            )


# A client whose deadline passes cancels the call itself (RST_STREAM) at the same instant
# the server's copy of that deadline fires; the server's copy starts when the request
# arrives, so it still has the transit time left when the client's cancel wins the race.
# A cancel this close to the deadline is the deadline (CI once counted it "cancelled").
DEADLINE_TOLERANCE_S = 0.25


def _outcome(error: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    """The ``status`` label: what the client got (``ok`` or the lower-case status name)."""
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_TOLERANCE_S:
            return "deadline_exceeded"
        return "cancelled"
    return status_label(error)
