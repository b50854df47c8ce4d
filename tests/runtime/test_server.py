"""The real server on loopback, called with an unmodified tritonclient and raw gRPC stubs."""

from __future__ import annotations

import re

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.harness import run_concurrently
from services.runtime.protocol import pb, pb_grpc


@pytest.fixture
def client(toy_server):
    c = tc.InferenceServerClient(url=toy_server.address)
    yield c
    c.close()


@pytest.fixture
def stub(toy_server):
    with grpc.insecure_channel(toy_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), channel


def _input(name, array, datatype):
    item = tc.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """Value of one Prometheus series in exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body = line[len(name) + 1 : line.index("}")]
            got = dict(re.findall(r'(\w+)="([^"]*)"', body))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_triton_client_server_and_model_state(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("toy")
    assert client.is_model_ready("toy", "1")
    assert not client.is_model_ready("toy", "99")
    meta = client.get_server_metadata()
    assert meta.name == "marrowscope"
    model = client.get_model_metadata("toy")
    assert model.name == "toy" and list(model.versions) == ["1"] and model.platform == "numpy"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("X", "FP32", [-1, -1]),
        ("PIXELS", "UINT8", [-1, -1, -1, 3]),
        ("TEXT", "BYTES", [-1]),
    ]
    assert {t.name for t in model.outputs} == {"Y", "INVERTED", "UPPER", "SCALE"}


def test_triton_client_infer_fp32_uint8_bytes(client):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    text = np.array([b"blast", "café".encode()], dtype=object)
    result = client.infer(
        "toy",
        [_input("X", x, "FP32"), _input("PIXELS", pixels, "UINT8"), _input("TEXT", text, "BYTES")],
        request_id="r-1",
    )
    np.testing.assert_array_equal(result.as_numpy("Y"), x * 1.0)
    np.testing.assert_array_equal(result.as_numpy("INVERTED"), 255 - pixels)
    assert result.as_numpy("UPPER").tolist() == [b"BLAST", "CAFé".encode()]
    response = result.get_response()
    assert response.model_version == "1" and response.id == "r-1"
    assert response.parameters["model_version"].string_param == "1"
    # requested outputs filter the response
    only = client.infer("toy", [_input("X", x, "FP32")], outputs=[tc.InferRequestedOutput("Y")])
    assert [o.name for o in only.get_response().outputs] == ["Y"]


def test_typed_contents_are_decoded(stub):
    infer, _ = stub
    request = pb.ModelInferRequest(model_name="toy")
    tensor = request.inputs.add(name="X", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.5, -2.0])
    text = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"npm1")
    response = infer.ModelInfer(request)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    y = np.frombuffer(response.raw_output_contents[outputs["Y"]], "<f4")
    assert y.tolist() == [1.5, -2.0]
    assert response.raw_output_contents[outputs["UPPER"]] == b"\x04\x00\x00\x00NPM1"


def test_health_serving_and_reflection(toy_server):
    with grpc.insecure_channel(toy_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "toy"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        # reflection can describe the service (what grpcurl needs)
        described = list(
            reflect.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="inference.GRPCInferenceService"
                        )
                    ]
                )
            )
        )
        files = described[0].file_descriptor_response.file_descriptor_proto
        assert files and b"ModelInfer" in files[0]


def test_metrics_follow_traffic_and_batches(toy_server):
    before = httpx.get(toy_server.metrics_url).text
    assert _sample(before, "marrowscope_model_info", {"model": "toy", "version": "1"}) == 1
    ok_before = _sample(
        before, "marrowscope_requests_total", {"model": "toy", "version": "1", "status": "ok"}
    )
    big_before = _sample(
        before, "marrowscope_batch_size_bucket", {"model": "toy", "version": "1", "le": "1.0"}
    )
    total_before = _sample(before, "marrowscope_batch_size_count", {"model": "toy", "version": "1"})

    n_threads, per_thread = 8, 3

    def work(seed: int) -> None:
        c = tc.InferenceServerClient(url=toy_server.address)
        try:
            for k in range(per_thread):
                x = np.full((1, 4), seed * 10 + k, np.float32)
                out = c.infer("toy", [_input("X", x, "FP32")], parameters={"delay_ms": 30})
                np.testing.assert_array_equal(out.as_numpy("Y"), x)
        finally:
            c.close()

    errors = run_concurrently(work, n_threads, timeout=30)
    assert not errors, errors

    after = httpx.get(toy_server.metrics_url).text
    assert (
        _sample(
            after, "marrowscope_requests_total", {"model": "toy", "version": "1", "status": "ok"}
        )
        == ok_before + n_threads * per_thread
    )
    batches = (
        _sample(after, "marrowscope_batch_size_count", {"model": "toy", "version": "1"})
        - total_before
    )
    singles = (
        _sample(
            after, "marrowscope_batch_size_bucket", {"model": "toy", "version": "1", "le": "1.0"}
        )
        - big_before
    )
    assert batches < n_threads * per_thread, "concurrent requests were never batched"
    assert batches - singles > 0, "no batch of more than one request in the histogram"
    for name in (
        "marrowscope_request_seconds_count",
        "marrowscope_queue_seconds_count",
        "marrowscope_compute_seconds_count",
    ):
        assert _sample(after, name, {"model": "toy", "version": "1"}) >= n_threads * per_thread
    assert "patient" not in after.lower()


def _raw_request(**kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=kw.pop("model_name", "toy"), **kw)


BAD_REQUESTS = {
    "wrong dtype": (
        _raw_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP64", shape=[1, 1])],
            raw_input_contents=[np.zeros(1, "<f8").tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "wrong rank": (
        _raw_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[3])],
            raw_input_contents=[np.zeros(3, "<f4").tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "wrong fixed dim": (
        _raw_request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="PIXELS", datatype="UINT8", shape=[1, 2, 2, 4]
                )
            ],
            raw_input_contents=[bytes(16)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "raw size mismatch": (
        _raw_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[2, 2])],
            raw_input_contents=[bytes(12)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "truncated BYTES": (
        _raw_request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
            ],
            raw_input_contents=[b"\x09\x00\x00\x00abc"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown input": (
        _raw_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="Z", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[bytes(4)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "no inputs": (_raw_request(), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (_raw_request(model_name="nope"), grpc.StatusCode.NOT_FOUND),
    "unknown version": (_raw_request(model_version="42"), grpc.StatusCode.NOT_FOUND),
    "oversized": (
        _raw_request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 400_000])
            ],
            raw_input_contents=[bytes(1_600_000)],
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_status_and_server_stays_healthy(stub, case):
    infer, channel = stub
    request, code = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        infer.ModelInfer(request)
    assert err.value.code() == code, err.value.details()
    if case == "unknown version":
        assert "'42'" in err.value.details() and "['1']" in err.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="toy"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = infer.ModelInfer(
        _raw_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[np.ones(1, "<f4").tobytes()],
        )
    )
    assert ok.model_version == "1"


def test_internal_error_is_generic_with_request_id(client, toy_server, caplog):
    x = np.ones((1, 1), np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer(
            "toy",
            [_input("X", x, "FP32")],
            parameters={"fail": True},
            headers={"x-request-id": "req-abc-123"},
        )
    assert err.value.status() == "StatusCode.INTERNAL"
    assert err.value.message() == "internal error, request id req-abc-123"
    assert "secret" not in err.value.message()
    text = httpx.get(toy_server.metrics_url).text
    assert (
        _sample(
            text,
            "marrowscope_requests_total",
            {"model": "toy", "version": "1", "status": "internal"},
        )
        >= 1
    )


def test_reply_over_the_limit_is_refused_and_counted_as_such(client, toy_server):
    """A reply gRPC cannot send must reach the client and the metrics as RESOURCE_EXHAUSTED,
    not be counted ``ok`` while the client gets "Sent message larger than max"."""
    labels = {"model": "toy", "version": "1"}
    before = httpx.get(toy_server.metrics_url).text
    x = np.ones((1, 100_000), np.float32)  # 400 KB in, 1.2 MB out; the limit is 1 MiB
    with pytest.raises(InferenceServerException) as err:
        client.infer("toy", [_input("X", x, "FP32")], parameters={"repeat": 3})
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "max_message_bytes" in err.value.message(), err.value.message()
    after = httpx.get(toy_server.metrics_url).text

    def delta(name, **extra):
        return _sample(after, name, {**labels, **extra}) - _sample(
            before, name, {**labels, **extra}
        )

    assert delta("marrowscope_requests_total", status="resource_exhausted") == 1
    assert delta("marrowscope_requests_total", status="ok") == 0
    sent = {"direction": "sent"}
    assert (
        _sample(after, "marrowscope_oversized_messages_total", sent)
        - _sample(before, "marrowscope_oversized_messages_total", sent)
        == 1
    )
    ok = client.infer("toy", [_input("X", x, "FP32")], parameters={"repeat": 2})  # 800 KB
    assert ok.as_numpy("Y").shape == (1, 200_000)


def test_request_over_the_limit_is_counted(stub, toy_server):
    """gRPC core refuses an oversized request before any handler runs; it must still show
    up in the metrics."""
    infer, _ = stub
    received = {"direction": "received"}
    before = _sample(
        httpx.get(toy_server.metrics_url).text, "marrowscope_oversized_messages_total", received
    )
    request, code = BAD_REQUESTS["oversized"]
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            infer.ModelInfer(request, timeout=10)
        assert err.value.code() == code
    text = httpx.get(toy_server.metrics_url).text
    assert _sample(text, "marrowscope_oversized_messages_total", received) == before + 2
    # a request that fits, or one that fails for another reason, is not counted there
    with pytest.raises(grpc.RpcError):
        infer.ModelInfer(BAD_REQUESTS["unknown model"][0], timeout=5)
    text = httpx.get(toy_server.metrics_url).text
    assert _sample(text, "marrowscope_oversized_messages_total", received) == before + 2
