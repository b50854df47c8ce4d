"""npm1 service as a real process: metadata, dynamic batching, hot reload under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from bench.harness import run_concurrently
from marrowscope.inference import Npm1Predictor
from marrowscope.models import load_model
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    metric,
    register,
    set_alias,
    status_of,
)

ALIAS = "test-services-npm1"
H, W = 48, 64


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("npm1")
    return [
        make_tiny_model_dir("npm1", root / f"m{seed}", seed=seed, input_size=[H, W])
        for seed in (0, 1)
    ]


@pytest.fixture(scope="module")
def versions(mlflow_server, model_dirs):
    first = register(mlflow_server, "npm1", model_dirs[0], ALIAS)
    second = register(mlflow_server, "npm1", model_dirs[1], f"{ALIAS}-next")
    set_alias(mlflow_server, "npm1", ALIAS, first)  # the service starts on the first
    return first, second


@pytest.fixture(scope="module")
def service(start_service, versions):
    return start_service(
        "npm1",
        model_uri=f"models:/marrowscope-npm1@{ALIAS}",
        poll_interval_s=0.5,
        max_batch_size=8,
        max_queue_delay_ms=40,
        version_grace_s=5,
    )


def _image(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def test_metadata_and_infer_match_in_process(client, versions, model_dirs):
    check_server_and_metadata(client, "npm1", versions[0], {"IMAGE": ("UINT8", [-1, H, W, 3])})
    images = _image(3, n=2)
    r = client.infer("npm1", [infer_input("IMAGE", images, "UINT8")])
    assert r.get_response().model_version == versions[0]
    p = r.as_numpy("P_NPM1")
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(
        p, Npm1Predictor(load_model(model_dirs[0])).predict(images), atol=1e-5
    )


def test_concurrent_requests_are_batched(client, service, versions):
    labels = {"model": "npm1", "version": versions[0]}
    count0 = metric(service.metrics_url, "marrowscope_batch_size_count", labels)
    singles0 = metric(service.metrics_url, "marrowscope_batch_size_bucket", {**labels, "le": "1.0"})
    n_threads, per_thread = 8, 3

    def work(seed: int) -> None:
        c = tc.InferenceServerClient(url=service.address)
        try:
            for k in range(per_thread):
                c.infer("npm1", [infer_input("IMAGE", _image(seed * 10 + k), "UINT8")])
        finally:
            c.close()

    errors = run_concurrently(work, n_threads, timeout=60)
    assert not errors, errors
    batches = metric(service.metrics_url, "marrowscope_batch_size_count", labels) - count0
    singles = (
        metric(service.metrics_url, "marrowscope_batch_size_bucket", {**labels, "le": "1.0"})
        - singles0
    )
    assert batches - singles > 0, "no batch of more than one request"
    assert batches < n_threads * per_thread


@pytest.mark.parametrize(
    ("inputs", "version", "code"),
    [
        (
            lambda: [infer_input("IMAGE", np.zeros((1, H, W, 3), np.float32), "FP32")],
            "",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: [infer_input("IMAGE", np.zeros((1, W, H, 3), np.uint8), "UINT8")],
            "",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: [infer_input("IMAGE", np.zeros((H, W, 3), np.uint8), "UINT8")],
            "",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: [infer_input("X", np.zeros((1, H, W, 3), np.uint8), "UINT8")],
            "",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: [infer_input("IMAGE", np.zeros((1, H, W, 3), np.uint8), "UINT8")],
            "12345",
            "NOT_FOUND",
        ),
    ],
    ids=["wrong-dtype", "wrong-size", "wrong-rank", "unknown-input", "unknown-version"],
)
def test_bad_requests_get_status_and_service_stays_healthy(client, service, inputs, version, code):
    with pytest.raises(InferenceServerException) as info:
        client.infer("npm1", inputs(), model_version=version)
    assert status_of(info.value) == code, info.value.message()
    check_still_healthy(service)


def test_hot_reload_under_load_loses_no_request(client, service, mlflow_server, versions):
    """Move the alias while a client loops: every request succeeds, the version switches."""
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        c = tc.InferenceServerClient(url=service.address)
        try:
            while not stop.is_set():
                r = c.infer("npm1", [infer_input("IMAGE", _image(len(seen)), "UINT8")])
                seen.append(r.get_response().model_version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        set_alias(mlflow_server, "npm1", ALIAS, versions[1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not errors:
            if seen[-5:] and all(v == versions[1] for v in seen[-5:]):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert seen[0] == versions[0] and seen[-1] == versions[1], seen
    assert set(seen) == set(versions)
    md = client.get_model_metadata("npm1")
    assert md.versions[0] == versions[1]
    check_still_healthy(service)
