"""The gateway's three give-up and bypass paths, each with its setting on both sides:

- poison job: an analysis whose workers died `MAX_ATTEMPTS` times fails with the reason
  instead of crashing workers forever, and one claim fewer is still taken over;
- webhook give-up: a target that keeps failing is tried `WEBHOOK_MAX_ATTEMPTS` times, then
  the outbox row is `dead` (the analysis's own status is untouched);
- lineage bypass: `ALLOW_LOCAL_LINEAGE` accepts an unverified ensemble (and MIL) lineage for
  local model directories only, never for registry versions.
Real HTTP on loopback for the webhook; the in-process app with the fake model clients.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest
from sqlalchemy import select

from services.gateway import store
from services.gateway.db import Analysis, Outbox
from services.gateway.pipeline import CaseImage, Pipeline
from tests.gateway.conftest import files, meta, png, wait_status
from tests.gateway.fakes import VERSIONS, FakeModelClients


def _submit(client, keys, **metadata) -> str:
    r = client.post("/v1/analyses", files=files(png(), metadata=meta(**metadata)), headers=keys)
    assert r.status_code == 202, r.text
    return r.json()["id"]


# -- poison job -------------------------------------------------------------------------------
def _queued_after_dead_workers(gateway, claims: int) -> tuple[str, dict]:
    """An analysis submitted to a gateway without a worker, then claimed `claims` times by
    workers that died at once (their leases expired when taken)."""
    client, services, keys = gateway(embedded_worker="false")
    with client:
        aid = _submit(client, keys["lis"])
    for k in range(claims):
        with services.sessions.begin() as session:
            a = store.claim_next(session, owner=f"dead-worker-{k}", lease_s=-1.0)
            assert a is not None and a.id == aid and a.attempts == k + 1
    return aid, keys["lis"]


def test_a_job_whose_workers_died_max_attempts_times_fails_with_the_reason(gateway):
    aid, key = _queued_after_dead_workers(gateway, claims=2)
    client, services, _ = gateway(max_attempts="2")
    with client:
        body = wait_status(client.get, aid, key)
    assert body["status"] == "failed" and body["result"] is None
    assert body["reason"] == "worker lost 2 times (crash or timeout); not retried again"
    with services.sessions() as session:
        assert session.get(Analysis, aid).attempts == 2  # not claimed a third time


def test_one_death_fewer_than_max_attempts_is_taken_over_and_completes(gateway):
    aid, key = _queued_after_dead_workers(gateway, claims=2)
    client, services, _ = gateway(max_attempts="3")
    with client:
        body = wait_status(client.get, aid, key)
    assert body["status"] == "succeeded", body
    with services.sessions() as session:
        assert session.get(Analysis, aid).attempts == 3


# -- webhook give-up -------------------------------------------------------------------------
class _FailingTarget:
    """A real HTTP server on 127.0.0.1 that answers every POST 503 and counts them."""

    def __init__(self) -> None:
        self.posts = 0
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                self.rfile.read(int(self.headers["Content-Length"]))
                target.posts += 1
                self.send_response(503)
                self.end_headers()

            def log_message(self, *args):
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def failing_target():
    target = _FailingTarget()
    yield target
    target.close()


def _outbox_row(services, done, timeout: float = 60.0) -> Outbox:
    end = time.monotonic() + timeout
    row = None
    while time.monotonic() < end:
        with services.sessions() as session:
            row = session.scalars(select(Outbox)).first()
        if row is not None and done(row):
            return row
        time.sleep(0.05)
    raise AssertionError(f"outbox row not done: {row and (row.status, row.attempts)}")


def test_a_webhook_that_keeps_failing_is_dead_after_max_attempts(gateway, failing_target):
    client, services, keys = gateway(
        webhook_allow_cidrs="127.0.0.0/8",
        webhook_max_attempts="3",
        webhook_backoff_s="0.05",
        webhook_backoff_max_s="0.1",
    )
    with client:
        aid = _submit(client, keys["lis"], webhook_url=failing_target.url)
        body = wait_status(client.get, aid, keys["lis"])
        row = _outbox_row(services, lambda o: o.status != "pending")
        assert (
            client.get(f"/v1/analyses/{aid}", headers=keys["lis"]).json()["status"]
            == (body["status"])
        )
    assert body["status"] == "succeeded"
    assert (row.status, row.attempts, row.delivered_at) == ("dead", 3, None)
    assert row.last_error and "503" in row.last_error
    assert failing_target.posts == 3  # one POST per attempt, none after the give-up


# -- lineage bypass --------------------------------------------------------------------------
def _run(settings, clients: FakeModelClients):
    case = [CaseImage(0, f"{0:064x}", png(320, 240, seed=31), um_per_px=0.27)]
    return asyncio.run(
        Pipeline(clients=clients, settings=settings).run(
            analysis_id="a", images=case, input_kind="fields", explain=False
        )
    )


@pytest.fixture
def local_upstreams(monkeypatch):
    """Segmentation and celltype served from local model directories (`local-<hash>`)."""
    monkeypatch.setitem(VERSIONS, "segmentation", "local-5e6a")
    monkeypatch.setitem(VERSIONS, "celltype", "local-ce11")


@pytest.mark.parametrize(
    ("local", "allow", "passes"),
    [
        (True, True, True),  # the bypass: a local model directory, allowed
        (True, False, False),  # local but not allowed (the default)
        (False, True, False),  # allowed, but registry versions are never bypassed
    ],
)
def test_allow_local_lineage_bypasses_local_models_only(
    make_settings, request, local, allow, passes
):
    if local:
        request.getfixturevalue("local_upstreams")
    clients = FakeModelClients(lineage="mismatch")  # ensemble built on segmentation "1"
    out = _run(make_settings(allow_local_lineage=str(allow).lower()), clients)
    if passes:
        assert out.status == "succeeded", out.reason
        assert out.result["p_aml"] is not None
    else:
        assert out.status == "failed" and out.reason.startswith("incompatible pipeline: ")
        assert f"pinned segmentation is {VERSIONS['segmentation']}" in out.reason


@pytest.mark.parametrize(("local", "allow"), [(True, True), (True, False), (False, True)])
def test_allow_local_lineage_bypasses_the_mil_lineage_for_a_local_celltype_only(
    make_settings, request, local, allow
):
    if local:
        request.getfixturevalue("local_upstreams")
    clients = FakeModelClients(
        lineage="match", targets=("aml", "npm1", "apl"), feature_units="um", mil="other_celltype"
    )
    settings = make_settings(apl_model="mil", allow_local_lineage=str(allow).lower())
    out = _run(settings, clients)
    assert out.status == "succeeded", out.reason
    apl = out.result["apl_morphology"]
    if local and allow:
        assert apl["status"] == "predicted" and apl["model"] == "mil" and apl["p"] is not None
    else:
        assert (apl["status"], apl["reason"]) == ("not_available", "mil_lineage_mismatch")
