"""Codec, batcher, error mapping, settings, device and codegen without a server."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import numpy as np
import pytest

from marrowscope.errors import IncompatiblePipeline, InvalidInput, ModelNotFound, ModelNotReady
from services.runtime import codegen
from services.runtime.batching import ModelWorker
from services.runtime.errors import status_for
from services.runtime.handler import TensorSpec
from services.runtime.protocol import pb
from services.runtime.servicer import decode_inputs, encode_response, tensor_to_raw
from tests.runtime.toy_service import ToyHandler, ToySettings

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


def _request(name, datatype, array, raw=True):
    request = pb.ModelInferRequest(model_name="toy")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    if raw:
        request.raw_input_contents.append(tensor_to_raw(array))
    return request, tensor


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_roundtrip_every_numeric_datatype(datatype):
    from services.runtime.handler import DATATYPE_TO_NUMPY

    array = (np.arange(6) % 2).astype(DATATYPE_TO_NUMPY[datatype]).reshape(2, 3)
    request, _ = _request("A", datatype, array)
    decoded = decode_inputs(request)["A"]
    assert decoded.dtype == array.dtype and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)
    decoded[0, 0] = decoded[0, 1]  # handlers get writable arrays


def test_bytes_roundtrip_keeps_empty_and_binary_elements():
    array = np.array([[b"", b"\x00\xff"], ["é".encode(), b"x" * 300]], dtype=object)
    request, _ = _request("T", "BYTES", array)
    decoded = decode_inputs(request)["T"]
    assert decoded.shape == (2, 2) and decoded.tolist() == array.tolist()
    response = encode_response(request, "toy", "7", {"T": decoded})
    assert response.raw_output_contents[0] == request.raw_input_contents[0]
    assert response.parameters["model_version"].string_param == "7"


def test_typed_contents_count_must_match_shape():
    request, tensor = _request("X", "FP32", np.zeros((2, 2), np.float32), raw=False)
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidInput, match="3 values"):
        decode_inputs(request)


def test_fp16_needs_raw_contents_and_raw_needs_one_per_input():
    request, _ = _request("H", "FP16", np.zeros(2, np.float16), raw=False)
    with pytest.raises(InvalidInput, match="raw_input_contents"):
        decode_inputs(request)
    request, _ = _request("X", "FP32", np.zeros(2, np.float32))
    request.inputs.add(name="Y", datatype="FP32", shape=[2])
    with pytest.raises(InvalidInput, match="2 inputs"):
        decode_inputs(request)


def test_bytes_output_rejects_non_bytes_elements():
    with pytest.raises(TypeError, match="bytes or str"):
        tensor_to_raw(np.array([1, b"a"], dtype=object))


def test_tensor_spec_checks_dtype_rank_and_fixed_dims():
    spec = TensorSpec("CROPS", "UINT8", (-1, 8, 8, 3))
    spec.check(np.zeros((5, 8, 8, 3), np.uint8))
    for bad in (
        np.zeros((5, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((5, 8, 9, 3), np.uint8),
    ):
        with pytest.raises(InvalidInput):
            spec.check(bad)


def test_status_mapping():
    assert status_for(InvalidInput("x"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(ModelNotFound("x"))[0] is grpc.StatusCode.NOT_FOUND
    assert status_for(ModelNotReady("x"))[0] is grpc.StatusCode.UNAVAILABLE
    code, message = status_for(IncompatiblePipeline("secret"), "rid-1")
    assert code is grpc.StatusCode.INTERNAL and message == "internal error, request id rid-1"


async def _submit_all(handler, requests, **kw):
    handler.name, handler.version = "toy", "1"
    handler.load()
    worker = ModelWorker(handler, **kw)
    try:
        return await asyncio.gather(*(worker.submit(x, p) for x, p in requests))
    finally:
        await worker.close()


def test_batcher_merges_only_compatible_requests_and_splits_outputs():
    handler = ToyHandler(2.0)
    requests = [({"X": np.full((1, 3), i, np.float32)}, {}) for i in range(4)]
    requests.append(({"X": np.full((2, 3), 9, np.float32)}, {}))  # 2 rows, same key
    requests.append(({"X": np.full((1, 5), 7, np.float32)}, {}))  # other shape
    requests.append(({"X": np.full((1, 3), 8, np.float32)}, {"delay_ms": 1}))  # other params
    results = asyncio.run(_submit_all(handler, requests, max_batch_size=8, max_queue_delay_s=0.05))
    for (inputs, _), result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["Y"], inputs["X"] * 2)
        assert result.outputs["SCALE"].tolist() == [2.0]  # batch_axis=False: copied, not split
    assert sorted(handler.calls) == [1, 1, 6]
    assert [r.batch_size for r in results[:5]] == [5] * 5
    assert results[5].batch_size == 1 and results[6].batch_size == 1


def test_batcher_respects_max_batch_size_and_opt_out():
    handler = ToyHandler(1.0)
    requests = [({"X": np.ones((1, 2), np.float32)}, {}) for _ in range(5)]
    asyncio.run(_submit_all(handler, requests, max_batch_size=2, max_queue_delay_s=0.05))
    assert sorted(handler.calls) == [1, 2, 2]
    unbatched = ToyHandler(1.0)
    unbatched.batchable = False
    asyncio.run(_submit_all(unbatched, requests, max_batch_size=8, max_queue_delay_s=0.05))
    assert unbatched.calls == [1] * 5


class _Rendezvous(ToyHandler):
    """Each call waits (up to a generous deadline) until `expected` calls are in flight at
    once, and records how many it saw: one model thread can never get past 1."""

    def __init__(self, expected: int) -> None:
        super().__init__(1.0)
        self.barrier = threading.Barrier(expected, timeout=60.0)
        self.met: list[bool] = []

    def predict(self, batch):
        try:
            self.barrier.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        return super().predict(batch)


@pytest.mark.parametrize("batchable", [True, False])
def test_model_threads_run_batches_and_requests_at_once(batchable):
    handler = _Rendezvous(2)
    handler.batchable = batchable
    handler.max_concurrency = 2
    # different shapes: two batches that cannot merge, so only a second thread runs both
    requests = [({"X": np.ones((1, k), np.float32)}, {}) for k in (2, 3)]
    results = asyncio.run(_submit_all(handler, requests, max_batch_size=8, max_queue_delay_s=0))
    assert handler.met == [True, True]
    assert [r.outputs["Y"].shape for r in results] == [(1, 2), (1, 3)]


def test_one_model_thread_runs_one_call_at_a_time():
    handler = _Rendezvous(2)
    handler.barrier = threading.Barrier(2, timeout=0.5)  # would be met only by a 2nd thread
    requests = [({"X": np.ones((1, k), np.float32)}, {}) for k in (2, 3)]
    asyncio.run(_submit_all(handler, requests, max_batch_size=8, max_queue_delay_s=0))
    assert handler.met == [False, False]


def test_model_threads_auto_fills_the_cores_left_by_intra_op_threads(monkeypatch):
    torch = pytest.importorskip("torch")
    from services.common import model_threads, usable_cores

    cores = usable_cores()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert model_threads(ToySettings(device="cpu")) == cores
        torch.set_num_threads(cores)
        assert model_threads(ToySettings(device="cpu")) == 1
        assert model_threads(ToySettings(device="cpu", model_threads=3)) == 3
    finally:
        torch.set_num_threads(before)


def test_usable_cores_honours_a_cgroup_cpu_quota(tmp_path):
    from services.common import usable_cores

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity
    quota.write_text("50000 100000\n")  # half a core: still one
    assert usable_cores(quota) == 1
    quota.write_text(f"{100000 * (affinity + 4)} 100000\n")  # above the affinity: affinity
    assert usable_cores(quota) == affinity
    assert usable_cores(tmp_path / "missing") == affinity


def test_settings_env_prefix(monkeypatch):
    monkeypatch.setenv("MS_TOY_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("MS_TOY_AUTOCAST", "bf16")
    settings = ToySettings()
    assert settings.max_batch_size == 3 and settings.autocast == "bf16"
    assert settings.model_name == "toy"
    monkeypatch.setenv("MS_TOY_DEVICE", "tpu")
    with pytest.raises(ValueError):
        ToySettings()


def test_device_selection_on_cpu():
    torch = pytest.importorskip("torch")
    from marrowscope.inference import autocast_context, select_device

    assert select_device("cpu").type == "cpu"
    with autocast_context(torch.device("cpu"), "fp16"):
        assert not torch.is_autocast_enabled()
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA"):
            select_device("cuda")


def test_codegen_is_idempotent_and_rewrites_imports(tmp_path):
    assert codegen.ensure_generated() is False  # already current: a no-op
    out = tmp_path / "_gen"
    assert codegen.ensure_generated(gen_dir=out) is True
    assert codegen.ensure_generated(gen_dir=out) is False
    grpc_stub = (out / "inference" / "grpc_predict_v2_pb2_grpc.py").read_text()
    assert "from services.runtime._gen.inference import grpc_predict_v2_pb2" in grpc_stub
    assert (
        "_descriptor_pool.Default()"
        not in (out / "inference" / "grpc_predict_v2_pb2.py").read_text()
    )


def test_a_cooperative_handler_stops_at_its_deadline_and_a_queued_request_never_starts():
    """The model thread cannot be interrupted; the handler polls ``cancellation.check()``
    between chunks, and a request whose deadline passed while it queued is not run."""
    from services.runtime.handler import Cancellation, RequestCancelled

    async def scenario():
        handler = ToyHandler(1.0)
        handler.batchable = False
        handler.name, handler.version = "toy", "1"
        handler.load()
        worker = ModelWorker(handler)
        x = {"X": np.ones((1, 2), np.float32)}
        try:
            started = time.monotonic()
            long = worker.submit(
                x, {"delay_ms": 30_000, "cooperative": True}, Cancellation(started + 0.5)
            )
            queued = worker.submit(x, {}, Cancellation(started + 0.2))  # waits behind `long`
            results = await asyncio.gather(long, queued, return_exceptions=True)
            return results, time.monotonic() - started, handler.calls
        finally:
            await worker.close(5)

    (long, queued), elapsed, calls = asyncio.run(scenario())
    assert isinstance(long, RequestCancelled) and long.reason == "deadline"
    assert isinstance(queued, RequestCancelled) and queued.reason == "deadline"
    assert elapsed < 2, elapsed
    assert calls == []  # neither finished predict


def test_cancelled_batch_stops_only_when_every_request_in_it_did():
    from services.runtime.handler import Cancellation

    a, b = Cancellation(), Cancellation()
    both = Cancellation.all_of([a, b])
    a.cancel()
    assert both.reason is None
    b.cancel()
    assert both.reason == "cancelled"


def test_fair_turns_alternate_between_waiting_requests():
    from services.runtime.handler import FairTurns

    turns, order = FairTurns(), []
    started = threading.Event()

    def work(name: str, chunks: int) -> None:
        for _ in range(chunks):
            with turns.turn():
                order.append(name)
                started.set()
                time.sleep(0.02)

    big = threading.Thread(target=work, args=("big", 20))
    big.start()
    started.wait(5)
    small = threading.Thread(target=work, args=("small", 2))
    small.start()
    small.join(5)
    big.join(5)
    first_small = order.index("small")
    # the small request waits for at most one chunk of the big one per chunk of its own
    assert order[first_small : first_small + 4].count("small") == 2, order
    assert first_small <= 3, order
