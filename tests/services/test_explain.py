"""Explain service as a real process: exact npm1 versions, modes, and a pointing-game check
on synthetic smears (figures are synthetic, functional evidence only)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from marrowscope.explain import pointing_game_ratio
from marrowscope.imaging import resize_for_model
from tests.services.helpers import (
    check_server_and_metadata,
    check_still_healthy,
    infer_input,
    metric,
    register,
    status_of,
)
from tests.services.synth_npm1 import HEIGHT, WIDTH, render, train_tiny_npm1

log = logging.getLogger(__name__)
ALIAS = "test-services-explain"
# Pointing game, median over 4 synthetic NPM1-mutated images (chance = 1; the maximum is
# 1 / blast area share, about 10 here). Measured: trained 7-8.5; the untrained network
# already scores about 3.4 because blasts are the largest, darkest cells.
POINTING_FLOOR = 5.0
OVER_UNTRAINED = 1.5


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    trained = register(mlflow_server, "npm1", train_tiny_npm1(root / "trained"), ALIAS)
    # the untrained network: the control, and a version reachable only by its number
    untrained = register(
        mlflow_server, "npm1", train_tiny_npm1(root / "untrained", epochs=0), f"{ALIAS}-untrained"
    )
    return trained, untrained


@pytest.fixture(scope="module")
def service(start_service, versions):
    return start_service(
        "explain", model_uri=f"models:/marrowscope-npm1@{ALIAS}", target_cache_size=1
    )


def _explain(client, image: np.ndarray, boxes: np.ndarray, client_timeout=None, **params):
    r = client.infer(
        "explain",
        [
            infer_input("IMAGE", image[None], "UINT8"),
            infer_input("BOXES", boxes.astype(np.float32), "FP32"),
        ],
        parameters={"target_model": "npm1", **params},
        client_timeout=client_timeout,
    )
    return r.as_numpy("HEATMAP"), r.as_numpy("CELL_IMPORTANCE"), r


def test_metadata(client, versions):
    check_server_and_metadata(
        client,
        "explain",
        versions[0],
        {"IMAGE": ("UINT8", [1, -1, -1, 3]), "BOXES": ("FP32", [-1, 4])},
    )


def test_cells_mode_points_at_the_blasts(client, versions):
    medians = {}
    for name, version in zip(("trained", "untrained"), versions, strict=True):
        ratios = []
        for sample in render("aml", "mutated", 4, seed=101):
            heat, importance, r = _explain(
                client, sample.image, sample.boxes, target_version=version, mode="cells"
            )
            assert r.get_response().model_version == versions[0]
            assert heat.shape == (HEIGHT, WIDTH) and importance.shape == (len(sample.boxes),)
            ratios.append(pointing_game_ratio(heat, sample.blast_mask, top_fraction=0.1))
        medians[name] = float(np.nanmedian(ratios))
        log.info("pointing game, synthetic, %s npm1: %s", name, np.round(ratios, 2).tolist())
    assert medians["trained"] > POINTING_FLOOR, medians
    assert medians["trained"] > OVER_UNTRAINED * medians["untrained"], medians


def test_image_off_the_model_size_is_resized_and_the_map_returned_at_its_size(client):
    sample = render("aml", "mutated", 1, seed=202)[0]
    big = resize_for_model(sample.image, (HEIGHT * 3 // 2, WIDTH * 3 // 2))
    heat, importance, _ = _explain(client, big, sample.boxes * 1.5)
    assert heat.shape == big.shape[:2] and importance.shape == (len(sample.boxes),)
    small_heat, small_importance, _ = _explain(client, sample.image, sample.boxes)
    assert np.corrcoef(importance, small_importance)[0, 1] > 0.8
    assert (
        pointing_game_ratio(
            heat,
            resize_for_model(
                sample.blast_mask.astype(np.uint8)[..., None].repeat(3, 2) * 255, big.shape[:2]
            )[..., 0]
            > 127,
        )
        > POINTING_FLOOR / 2
    )


def test_grid_mode_and_no_cells(client):
    sample = render("aml", "mutated", 1, seed=303)[0]
    heat, importance, _ = _explain(
        client, sample.image, sample.boxes, mode="grid", window=24, stride=24
    )
    assert heat.shape == (HEIGHT, WIDTH) and np.isfinite(heat).all()
    assert importance.shape == (len(sample.boxes),) and np.abs(heat).max() > 0
    heat, importance, _ = _explain(client, sample.image, np.zeros((0, 4), np.float32))
    assert importance.shape == (0,) and not heat.any()


def test_another_registered_version_is_loaded_exactly(client, versions, service):
    sample = render("aml", "mutated", 1, seed=404)[0]
    maps = {}
    # target_cache_size=1: the untrained one is loaded, reused, dropped, loaded again
    for version in (versions[1], versions[1], versions[0], "", versions[1]):
        heat, importance, r = _explain(client, sample.image, sample.boxes, target_version=version)
        assert heat.shape == (HEIGHT, WIDTH) and importance.shape == (len(sample.boxes),)
        # the response's version is the explain service's own; the target is the one named
        assert r.get_response().model_version == versions[0]
        maps.setdefault(version or versions[0], []).append(importance)
    for got in maps.values():  # the same version gives the same answer, cached or not
        for other in got[1:]:
            np.testing.assert_allclose(other, got[0], atol=1e-6)
    assert not np.allclose(maps[versions[0]][0], maps[versions[1]][0], atol=1e-4)
    check_still_healthy(service)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"target_version": "9999"}, "NOT_FOUND"),
        ({"target_version": "local-0123456789ab"}, "NOT_FOUND"),
        ({"target_model": "ensemble"}, "INVALID_ARGUMENT"),
        ({"mode": "saliency"}, "INVALID_ARGUMENT"),
        ({"mode": "grid", "window": 8, "stride": 16}, "INVALID_ARGUMENT"),
        ({"mode": "grid", "window": 1, "stride": 1}, "INVALID_ARGUMENT"),
        ({"mode": "grid", "window": "big"}, "INVALID_ARGUMENT"),
    ],
    ids=[
        "unknown-version",
        "foreign-local-version",
        "other-target",
        "bad-mode",
        "stride-over-window",
        "too-many-passes",
        "window-not-int",
    ],
)
def test_bad_parameters_get_status_and_service_stays_healthy(client, service, params, code):
    sample = render("control", "na", 1, seed=505)[0]
    with pytest.raises(InferenceServerException) as info:
        _explain(client, sample.image, sample.boxes, **params)
    assert status_of(info.value) == code, info.value.message()
    check_still_healthy(service)


def test_bad_tensors_are_refused(client, service):
    image = np.zeros((1, HEIGHT, WIDTH, 3), np.uint8)
    for inputs in (
        [
            infer_input("IMAGE", image, "UINT8"),
            infer_input("BOXES", np.zeros((2, 3), np.float32), "FP32"),
        ],
        [
            infer_input("IMAGE", image, "UINT8"),
            infer_input("BOXES", np.full((1, 4), np.nan, np.float32), "FP32"),
        ],
        [
            infer_input("IMAGE", image.astype(np.float32), "FP32"),
            infer_input("BOXES", np.zeros((1, 4), np.float32), "FP32"),
        ],
    ):
        with pytest.raises(InferenceServerException) as info:
            client.infer("explain", inputs)
        assert status_of(info.value) == "INVALID_ARGUMENT", info.value.message()
    check_still_healthy(service)


# -- work limits, cancellation and fairness (a real service with small occlusion batches) --
BUSY_MAX_BOXES = 300
BUSY_GRACE_S = 3.0


@pytest.fixture(scope="module")
def busy_service(start_service, versions):
    return start_service(
        "explain",
        model_uri=f"models:/marrowscope-npm1@{ALIAS}",
        max_boxes=BUSY_MAX_BOXES,
        occlusion_batch_size=1,  # one occluded copy per turn: a small call waits least
        grace_period_s=BUSY_GRACE_S,
    )


def _boxes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [WIDTH - 24, HEIGHT - 24], size=(n, 2))
    return np.concatenate([xy, xy + 24], axis=1).astype(np.float32)


def _explain_call(address: str, n_boxes: int, timeout_s: float) -> tuple[float, str]:
    """(seconds, outcome) of one cells-mode call with its own client and deadline."""
    import time

    import tritonclient.grpc as tc

    image = render("aml", "mutated", 1, seed=606)[0].image
    client = tc.InferenceServerClient(url=address)
    started = time.monotonic()
    try:
        _explain(client, image, _boxes(n_boxes), client_timeout=timeout_s, mode="cells")
        outcome = "OK"
    except InferenceServerException as exc:
        outcome = status_of(exc)
    finally:
        client.close()
    return time.monotonic() - started, outcome


def test_too_many_boxes_are_refused(busy_service):
    seconds, outcome = _explain_call(busy_service.address, BUSY_MAX_BOXES + 1, 30)
    assert outcome == "INVALID_ARGUMENT" and seconds < 5
    check_still_healthy(busy_service)


def test_an_abandoned_big_request_stops_and_a_small_one_answers_at_once(busy_service):
    """The issue's probe: a big call abandoned by its client after ~3 s delayed the next
    one-box call by 56 s. Measured here (synthetic model, this machine): the big call needs
    several seconds of occlusion passes; the one-box call right after it must answer well
    under 5 s."""
    before = metric(
        busy_service.metrics_url,
        "marrowscope_requests_total",
        {"model": "explain", "status": "deadline_exceeded"},
    )
    seconds, outcome = _explain_call(busy_service.address, BUSY_MAX_BOXES, 3.0)
    assert outcome == "DEADLINE_EXCEEDED", (seconds, outcome)
    small_s, small = _explain_call(busy_service.address, 1, 30)
    log.info("one-box call after an abandoned %d-box call: %.2f s", BUSY_MAX_BOXES, small_s)
    assert small == "OK" and small_s < 5.0, small_s
    assert (
        metric(
            busy_service.metrics_url,
            "marrowscope_requests_total",
            {"model": "explain", "status": "deadline_exceeded"},
        )
        >= before + 1
    )


def test_small_requests_do_not_queue_behind_a_running_big_one(busy_service):
    import threading
    import time

    big: dict = {}

    def run_big() -> None:
        big["result"] = _explain_call(busy_service.address, BUSY_MAX_BOXES, 10.0)

    thread = threading.Thread(target=run_big)
    thread.start()
    time.sleep(1.5)  # the big call is now running its occlusion batches
    small_s, small = _explain_call(busy_service.address, 1, 30)
    thread.join(30)
    log.info("one-box call beside a running %d-box call: %.2f s", BUSY_MAX_BOXES, small_s)
    assert small == "OK" and small_s < 5.0, (small_s, big)
    assert big["result"][1] in ("OK", "DEADLINE_EXCEEDED"), big


def test_sigterm_during_a_big_request_exits_within_the_grace_period(busy_service):
    """Last test of the module: it stops the busy service."""
    import threading
    import time

    thread = threading.Thread(
        target=_explain_call, args=(busy_service.address, BUSY_MAX_BOXES, 60.0)
    )
    thread.start()
    time.sleep(1.5)
    started = time.monotonic()
    code = busy_service.stop()
    elapsed = time.monotonic() - started
    thread.join(30)
    log.info("explain exited %d, %.2f s after SIGTERM during a big request", code, elapsed)
    assert code == 0, busy_service.log_tail()
    assert elapsed < BUSY_GRACE_S, elapsed
