"""Concurrent submits with one Idempotency-Key (issue 14 item 10): the losing request must not
delete content-addressed image files, which are the winner's too. Blobs are deleted only by
the sweep, for unreferenced ones past a grace period."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select

from tests.gateway.conftest import create_key_cli, files, meta, png, settings_env, wait_status


def test_race_loser_that_wrote_the_blob_leaves_the_winners_images(gateway, monkeypatch):
    """Forces the interleaving that loses images today: request B writes the blob first, then
    request A (same key, same content) commits first; B's insert then fails on the
    idempotency key and it replays A's analysis. A's images must still be there."""
    from services.gateway import store
    from services.gateway.db import Idempotency

    client, services, keys = gateway()
    real_create = store.create_analysis
    b_inside = threading.Event()
    calls: list[str] = []

    def create_analysis(session, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # request B: wait until A has committed its analysis
            b_inside.set()
            end = time.monotonic() + 20
            while time.monotonic() < end:
                with services.sessions() as s:
                    if s.scalar(select(Idempotency.analysis_id)):
                        break
                time.sleep(0.02)
        return real_create(session, **kw)

    monkeypatch.setattr(store, "create_analysis", create_analysis)
    image = png(seed=77)
    sha = hashlib.sha256(image).hexdigest()
    headers = {**keys["lis"], "Idempotency-Key": "race-1"}
    out: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        out[name] = client.post(
            "/v1/analyses", files=files(image, metadata=meta()), headers=headers
        )

    with client:
        b = threading.Thread(target=post, args=("b",), name="b")
        b.start()
        assert b_inside.wait(20)
        assert services.blobs.exists(sha)  # B wrote it
        post("a")
        b.join(30)
        assert out["a"].status_code == 202 and out["b"].status_code == 200, out
        assert out["a"].json()["id"] == out["b"].json()["id"]
        assert services.blobs.exists(sha), "the losing request deleted the winner's image"
        body = wait_status(client.get, out["a"].json()["id"], keys["lis"])
        assert body["status"] == "succeeded", body["reason"]


@pytest.mark.slow
def test_concurrent_same_key_submits_on_a_real_gateway(tmp_path, spawn, port_factory):
    """8 threads x 5 rounds, each round one key and fresh images: one analysis per round,
    every image file readable, every analysis succeeds."""
    env = settings_env(tmp_path / "gw", MS_GATEWAY_RATE_LIMIT_PER_MIN="100000")
    key = create_key_cli(env, scopes="submit,read")
    gw = spawn(env, port_factory(), log=tmp_path / "gateway.log")
    gw.wait_healthy()
    image_root = tmp_path / "gw" / "images"
    ids = []
    with (
        httpx.Client(base_url=gw.url, timeout=30, headers={"X-API-Key": key}) as c,
        ThreadPoolExecutor(8) as pool,
    ):
        for rnd in range(5):
            images = [png(seed=1000 + 2 * rnd), png(seed=1001 + 2 * rnd)]
            barrier = threading.Barrier(8)

            def submit(_k: int, images=images, rnd=rnd, barrier=barrier) -> httpx.Response:
                barrier.wait()
                return c.post(
                    "/v1/analyses",
                    files=files(*images, metadata=meta()),
                    headers={"Idempotency-Key": f"round-{rnd}"},
                )

            responses = list(pool.map(submit, range(8)))
            assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
            assert sorted(r.status_code for r in responses).count(202) == 1
            assert len({r.json()["id"] for r in responses}) == 1
            ids.append(responses[0].json()["id"])
            for data in images:
                sha = hashlib.sha256(data).hexdigest()
                assert (image_root / sha[:2] / sha[2:4] / sha).read_bytes() == data
        for aid in ids:
            body = wait_status(c.get, aid, {}, timeout=60)
            assert body["status"] == "succeeded", body["reason"]


def test_sweep_removes_only_unreferenced_blobs_past_the_grace_period(gateway):
    from services.gateway.blobs import sweep_unreferenced

    client, services, keys = gateway()
    with client:
        aid = client.post(
            "/v1/analyses",
            files=files(png(seed=3), metadata=meta(options={"explain": True})),
            headers=keys["lis"],
        ).json()["id"]
        result = wait_status(client.get, aid, keys["lis"])["result"]
    referenced = {result["images"][0]["sha256"], result["images"][0]["heatmap_sha256"]}
    orphan, _ = services.blobs.put(b"orphan: an upload whose request failed")
    fresh, _ = services.blobs.put(b"fresh: a request still in flight")
    revived, _ = services.blobs.put(b"old, but a new request is storing it again")
    old = time.time() - 7200
    for sha in (orphan, revived, *referenced):
        os.utime(services.blobs.path(sha), (old, old))
    services.blobs.put(b"old, but a new request is storing it again")  # refreshes the mtime
    removed = sweep_unreferenced(services.sessions, services.blobs, grace_s=3600)
    assert removed == [orphan]
    assert not services.blobs.exists(orphan)
    assert all(services.blobs.exists(s) for s in (fresh, revived, *referenced))
