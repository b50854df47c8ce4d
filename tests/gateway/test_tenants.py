"""Tenants (issue 14 item 6): a key sees only its tenant's analyses, searches, reports,
images and retries; another tenant's id answers 404 like a missing one; idempotency keys are
per tenant; admin sees every tenant; the audit records each entry's tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from marrowscope.paths import PROJECT_ROOT
from tests.gateway.conftest import files, meta, png, wait_status


@pytest.fixture
def tenants(gateway):
    from services.gateway.auth import create_key

    client, services, keys = gateway(rate_limit_per_min="100000", webhook_allow_cidrs="127.0.0.0/8")
    with services.sessions.begin() as session:
        for name, tenant in (("site-a", "a"), ("site-b", "b")):
            keys[name] = {
                "X-API-Key": create_key(
                    session, name=name, scopes=["submit", "read"], tenant=tenant
                )[0]
            }
    return client, services, keys


def test_another_tenant_cannot_see_list_cancel_retry_or_fetch(tenants):
    client, services, keys = tenants
    a, b = keys["site-a"], keys["site-b"]
    with client:
        doc = meta(
            accession_id="ACC-A", options={"explain": True}, webhook_url="http://127.0.0.1:9/h"
        )
        r = client.post(
            "/v1/analyses",
            files=files(png(seed=5), metadata=doc),
            headers={**a, "Idempotency-Key": "k-1"},
        )
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        assert wait_status(client.get, aid, a)["status"] == "succeeded"
        urls = [
            f"/v1/analyses/{aid}",
            f"/v1/analyses/{aid}/report",
            f"/v1/analyses/{aid}/report?format=fhir",
            f"/v1/analyses/{aid}/images/0/overlay.png",
            f"/v1/analyses/{aid}/images/0/heatmap.png",
        ]
        for url in urls:
            assert client.get(url, headers=a).status_code == 200, url
            for other in (b, keys["lis"], keys["reader"]):  # tenant b and the default tenant
                r = client.get(url, headers=other)
                assert r.status_code == 404 and r.json()["error"] == "not_found", (url, r.text)
                missing = client.get(url.replace(aid, "0" * 32), headers=other).json()
                assert r.json()["detail"].replace(aid, "ID") == missing["detail"].replace(
                    "0" * 32, "ID"
                )
        assert client.delete(f"/v1/analyses/{aid}", headers=b).status_code == 404
        assert client.post(f"/v1/analyses/{aid}/retry", headers=b).status_code == 404
        for params in ({}, {"accession": "ACC-A"}):
            page = client.get("/v1/analyses", params=params, headers=b).json()
            assert page["total"] == 0 and page["items"] == []
            page = client.get("/v1/analyses", params=params, headers=a).json()
            assert [i["id"] for i in page["items"]] == [aid]

        # idempotency keys are per tenant: b's "k-1" is a new analysis of b's, not a replay
        r = client.post(
            "/v1/analyses",
            files=files(png(seed=5), metadata=doc),
            headers={**b, "Idempotency-Key": "k-1"},
        )
        assert r.status_code == 202 and r.json()["id"] != aid
        bid = r.json()["id"]
        replay = client.post(
            "/v1/analyses",
            files=files(png(seed=5), metadata=doc),
            headers={**a, "Idempotency-Key": "k-1"},
        )
        assert replay.status_code == 200 and replay.json()["id"] == aid

        # admin sees and lists every tenant, and reads the audit by tenant
        admin = keys["admin"]
        assert client.get(f"/v1/analyses/{aid}", headers=admin).status_code == 200
        assert client.get(f"/v1/analyses/{bid}", headers=admin).json()["id"] == bid
        ids = {i["id"] for i in client.get("/v1/analyses", headers=admin).json()["items"]}
        assert {aid, bid} <= ids
        audit_a = client.get("/v1/audit", params={"tenant": "a"}, headers=admin).json()
        assert audit_a and {e["tenant"] for e in audit_a} == {"a"}
        assert {"submit", "read", "report", "overlay", "heatmap", "list"} <= {
            e["action"] for e in audit_a
        }
        everyone = client.get("/v1/audit", params={"limit": 1000}, headers=admin).json()
        assert {"a", "b", "default"} <= {e["tenant"] for e in everyone}
        assert client.get("/v1/audit", headers=a).status_code == 403
        # b's own analysis is b's to cancel; a cannot touch it
        assert client.delete(f"/v1/analyses/{bid}", headers=a).status_code == 404

    from services.gateway.db import Outbox

    with services.sessions() as session:
        payloads = [json.loads(p) for p in session.scalars(select(Outbox.payload))]
    assert {p["tenant"] for p in payloads if p["analysis_id"] == aid} == {"a"}


def test_admin_can_cancel_and_retry_any_tenants_analysis(tenants, monkeypatch):
    client, _, keys = tenants
    # slow enough to be cancelled while it runs (the doorbell starts it at once)
    monkeypatch.setenv("MS_TEST_FAKE_SEG_DELAY_S", "3.0")
    with client:
        aid = client.post(
            "/v1/analyses", files=files(png(seed=8), metadata=meta()), headers=keys["site-a"]
        ).json()["id"]
        wait_status(client.get, aid, keys["site-a"], want={"running"})
        r = client.delete(f"/v1/analyses/{aid}", headers=keys["admin"])
        assert r.status_code == 202, r.text
        assert wait_status(client.get, aid, keys["site-a"])["status"] == "cancelled"
        r = client.post(f"/v1/analyses/{aid}/retry", headers=keys["admin"])
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        assert wait_status(client.get, aid, keys["site-a"])["status"] == "succeeded"


def test_keys_cli_creates_a_tenant_key_and_rejects_a_bad_tenant(tmp_path):
    env = {
        **os.environ,
        "MS_GATEWAY_DATA_DIR": str(tmp_path / "gw"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "services.gateway.keys", *args],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
        )

    made = cli("create", "--name", "b", "--scopes", "submit,read", "--tenant", "site-b")
    assert made.returncode == 0 and "tenant site-b" in made.stderr, made.stderr
    bad = cli("create", "--name", "x", "--scopes", "read", "--tenant", "Site B")
    assert bad.returncode == 2 and "tenant must match" in bad.stderr
    default = cli("create", "--name", "d", "--scopes", "read")
    assert default.returncode == 0
    rows = [ln.split("\t") for ln in cli("list").stdout.splitlines()]
    assert sorted((r[1], r[2]) for r in rows) == [("b", "site-b"), ("d", "default")]
