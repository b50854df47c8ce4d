"""Hot reload under load: a client loops while the resolver's wanted version changes."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.protocol import pb, pb_grpc
from tests.runtime.conftest import start_toy
from tests.runtime.test_server import _input, _sample


@pytest.fixture
def reloading_server(port_factory):
    server = start_toy(port_factory, version="1", poll_interval_s=0.1, version_grace_s=1.5)
    yield server
    server.stop()


def _named_request(version: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="toy",
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.full(1, 3, "<f4").tobytes()],
    )


def test_hot_reload_under_load(reloading_server):
    server = reloading_server
    seen: list[tuple[int, str, float]] = []  # (client, version, Y) in completion order
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop(client_id: int) -> None:
        client = tc.InferenceServerClient(url=server.address)
        x = np.full((1, 2), 3, np.float32)
        try:
            while not stop.is_set():
                try:
                    out = client.infer("toy", [_input("X", x, "FP32")], parameters={"delay_ms": 5})
                    seen.append(
                        (
                            client_id,
                            out.get_response().model_version,
                            float(out.as_numpy("Y")[0, 0]),
                        )
                    )
                except BaseException as exc:  # every failure is a test failure
                    errors.append(exc)
        finally:
            client.close()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.wanted["version"] = "2"
        deadline = time.monotonic() + 10
        while not any(v == "2" for _, v, _ in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        # During the grace period the old version still answers when named.
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            old = stub.ModelInfer(_named_request("1"))
            assert old.model_version == "1"
            assert (
                np.frombuffer(
                    old.raw_output_contents[[o.name for o in old.outputs].index("Y")], "<f4"
                )[0]
                == 3.0
            )
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="toy"))
            assert list(meta.versions) == ["2", "1"]
        text = httpx.get(server.metrics_url).text
        assert _sample(text, "marrowscope_model_info", {"model": "toy", "version": "1"}) == 1
        assert _sample(text, "marrowscope_model_info", {"model": "toy", "version": "2"}) == 1
        time.sleep(0.3)  # more traffic on the new version
    finally:
        stop.set()
        for w in workers:
            w.join(10)

    assert not errors, errors[:3]
    versions = [v for _, v, _ in seen]
    assert "1" in versions and "2" in versions
    for client_id in range(3):  # each client's requests are sequential: once new, never old
        mine = [v for c, v, _ in seen if c == client_id]
        assert "2" in mine and set(mine[mine.index("2") :]) == {"2"}, mine
    assert all(y == 3.0 * float(v) for _, v, y in seen), "values do not match the version"

    # After the grace period the old version is gone, with a helpful NOT_FOUND.
    deadline = time.monotonic() + 5
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                stub.ModelInfer(_named_request("1"))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                assert "'1'" in err.details() and "['2']" in err.details()
                break
            assert time.monotonic() < deadline, "old version still served after its grace period"
            time.sleep(0.1)
    text = httpx.get(server.metrics_url).text
    assert _sample(text, "marrowscope_model_info", {"model": "toy", "version": "1"}) == 0


def test_shutdown_turns_health_not_serving_and_finishes_in_flight(port_factory):
    server = start_toy(port_factory)
    channel = grpc.insecure_channel(server.address)
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="toy"), timeout=20
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = _named_request("1")
        request.parameters["delay_ms"].int64_param = 800
        slow = stub.ModelInfer.future(request)
        time.sleep(0.3)
        shutdown = asyncio.run_coroutine_threadsafe(server.server.shutdown(), server.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch stream would hold the stop for the whole grace period
        assert slow.result(10).model_version == "1"
        shutdown.result(10)
    finally:
        channel.close()
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)
