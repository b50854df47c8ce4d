"""A model-service outage longer than the call retries delays the queue instead of failing it
(issue 14 item 1), on a real gateway process.

The outage is switched on and off in the running gateway through the fake clients'
`MS_TEST_FAKE_DOWN_FILE`; `tests/e2e/test_pipeline.py` kills and restarts a real model
service process for the same behaviour end to end.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.gateway.conftest import create_key_cli, files, meta, png, settings_env

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "abstained", "cancelled"}


def _statuses(c: httpx.Client, ids: list[str]) -> list[dict]:
    return [c.get(f"/v1/analyses/{i}").json() for i in ids]


def _wait_final(c: httpx.Client, ids: list[str], timeout: float = 90) -> list[dict]:
    end = time.monotonic() + timeout
    bodies: list[dict] = []
    while time.monotonic() < end:
        bodies = _statuses(c, ids)
        if all(b["status"] in FINAL for b in bodies):
            return bodies
        time.sleep(0.3)
    raise AssertionError(f"not finished after {timeout} s: {[b['status'] for b in bodies]}")


def _start(tmp_path: Path, spawn, port: int, **extra: str):
    down = tmp_path / "down.txt"
    env = settings_env(
        tmp_path / "gw",
        MS_TEST_FAKE_DOWN_FILE=str(down),
        MS_GATEWAY_READY_CHECK_S="0.2",
        MS_GATEWAY_REQUEUE_BACKOFF_S="0.2",
        MS_GATEWAY_REQUEUE_BACKOFF_MAX_S="0.5",
        MS_GATEWAY_RATE_LIMIT_PER_MIN="100000",
        MS_GATEWAY_WORKERS="2",
        **extra,
    )
    key = create_key_cli(env, scopes="submit,read")
    gw = spawn(env, port, log=tmp_path / "gateway.log")
    gw.wait_healthy()
    db = create_engine(f"sqlite:///{tmp_path / 'gw' / 'gateway.db'}")
    return gw, key, down, db


def test_outage_longer_than_the_retries_delays_every_queued_analysis(tmp_path, spawn, port_factory):
    """Service down (not ready) for ~4 s, far longer than the ~0.1 s the call retries span:
    nothing is claimed or failed meanwhile; after it comes back all 12 succeed."""
    gw, key, down, db = _start(tmp_path, spawn, port_factory())
    down.write_text("segmentation\n")
    time.sleep(0.5)  # let the worker see the outage
    with httpx.Client(base_url=gw.url, timeout=10, headers={"X-API-Key": key}) as c:
        ids = [
            c.post("/v1/analyses", files=files(png(seed=s), metadata=meta())).json()["id"]
            for s in range(12)
        ]
        time.sleep(4.0)
        during = _statuses(c, ids)
        assert {b["status"] for b in during} == {"queued"}, [b["status"] for b in during]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"]["segmentation"] is False
        down.unlink()
        bodies = _wait_final(c, ids)
    assert [b["status"] for b in bodies] == ["succeeded"] * 12, [b["reason"] for b in bodies]
    with db.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM analyses")).scalars().all()
    db.dispose()
    assert set(attempts) == {1}  # claimed once each, after the outage


def test_calls_failing_while_ready_requeue_with_backoff_then_succeed(tmp_path, spawn, port_factory):
    """The service reports ready but every call fails (it died after the readiness check):
    runs meet UNAVAILABLE after their retries and are requeued with backoff, not failed."""
    gw, key, down, db = _start(tmp_path, spawn, port_factory())
    down.write_text("segmentation:calls\n")
    with httpx.Client(base_url=gw.url, timeout=10, headers={"X-API-Key": key}) as c:
        ids = [
            c.post("/v1/analyses", files=files(png(seed=s), metadata=meta())).json()["id"]
            for s in range(6)
        ]
        time.sleep(3.0)
        during = _statuses(c, ids)
        assert all(b["status"] in ("queued", "running") for b in during), during
        waiting = [b for b in during if b["status"] == "queued" and b["reason"]]
        assert waiting, during
        assert "segmentation service unavailable" in waiting[0]["reason"]
        assert waiting[0]["reason"].startswith("requeued (")
        down.unlink()
        bodies = _wait_final(c, ids)
    assert [b["status"] for b in bodies] == ["succeeded"] * 6, [b["reason"] for b in bodies]
    assert all(b["reason"] is None for b in bodies)
    with db.connect() as conn:
        rows = conn.execute(text("SELECT attempts, requeues FROM analyses")).all()
    db.dispose()
    assert all(a == 1 for a, _ in rows), rows  # an outage burns no crash attempts
    assert min(r for _, r in rows) >= 1, rows  # every one met the outage and was requeued
    # backoff: 3 s of outage at 0.2, 0.4, 0.5, 0.5 ... s means a handful of runs, not hundreds
    assert max(r for _, r in rows) <= 12, rows


def test_past_the_window_it_fails_and_an_explicit_retry_runs_it_again(
    tmp_path, spawn, port_factory
):
    gw, key, down, db = _start(tmp_path, spawn, port_factory(), MS_GATEWAY_REQUEUE_WINDOW_S="1.5")
    reader = create_key_cli(settings_env(tmp_path / "gw"), scopes="read")
    admin = create_key_cli(settings_env(tmp_path / "gw"), scopes="admin")
    down.write_text("segmentation:calls\n")
    with httpx.Client(base_url=gw.url, timeout=10, headers={"X-API-Key": key}) as c:
        h = {"Idempotency-Key": "ACC-9-1"}
        aid = c.post("/v1/analyses", files=files(png(), metadata=meta()), headers=h).json()["id"]
        (body,) = _wait_final(c, [aid], timeout=30)
        assert body["status"] == "failed"
        assert "segmentation service unavailable" in body["reason"]
        assert "not retried again" in body["reason"]
        # a same-key resubmit replays the failed analysis unchanged (documented)...
        again = c.post("/v1/analyses", files=files(png(), metadata=meta()), headers=h)
        assert again.status_code == 200 and again.json() == {
            "id": aid,
            "status": "failed",
            "location": f"/v1/analyses/{aid}",
        }
        down.unlink()
        # ...and POST /retry runs it again (submit scope; read alone is refused)
        refused = c.post(f"/v1/analyses/{aid}/retry", headers={"X-API-Key": reader})
        assert refused.status_code == 403
        r = c.post(f"/v1/analyses/{aid}/retry")
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        assert r.json()["reason"] is None
        (body,) = _wait_final(c, [aid])
        assert body["status"] == "succeeded" and body["result"]["p_aml"] is not None
        conflict = c.post(f"/v1/analyses/{aid}/retry")
        assert conflict.status_code == 409 and conflict.json()["error"] == "not_retryable"
        assert c.post("/v1/analyses/nope/retry").status_code == 404
        audit = c.get("/v1/audit", headers={"X-API-Key": admin}).json()
    retries = [a for a in audit if a["action"] == "retry"]
    assert len(retries) == 1 and retries[0]["resource"] == aid
    assert retries[0]["detail"].startswith("was failed: ")


def test_explain_down_holds_only_the_analyses_that_asked_for_explanations(gateway, monkeypatch):
    """The explained case is never claimed while explain is down (no attempt burnt), then
    fails once its requeue window is over; the plain case runs meanwhile."""
    from services.gateway.db import Analysis
    from tests.gateway.conftest import wait_status

    monkeypatch.setenv("MS_TEST_FAKE_DOWN", "explain")
    client, services, keys = gateway(requeue_window_s="3", ready_check_s="0.2")
    h = keys["lis"]
    with client:
        plain = client.post("/v1/analyses", files=files(png(seed=1), metadata=meta()), headers=h)
        explained = client.post(
            "/v1/analyses",
            files=files(png(seed=2), metadata=meta(options={"explain": True})),
            headers=h,
        )
        assert wait_status(client.get, plain.json()["id"], h)["status"] == "succeeded"
        held = client.get(f"/v1/analyses/{explained.json()['id']}", headers=h).json()
        assert held["status"] == "queued" and held["reason"] is None, held
        body = wait_status(client.get, explained.json()["id"], h, want={"failed"}, timeout=30)
    assert body["reason"].startswith(
        "model service(s) explain not ready for longer than the requeue window (3 s)"
    )
    with services.sessions() as session:
        assert session.get(Analysis, explained.json()["id"]).attempts == 0
    assert "explain" not in services.clients.calls  # never called the down service
