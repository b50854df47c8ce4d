"""API behaviour with the in-process app (TestClient) and the fake model clients."""

from __future__ import annotations

import json

import pytest

from tests.gateway.conftest import files, meta, png, wait_status


def _submit(client, keys, *images, key="lis", **kw):
    return client.post("/v1/analyses", files=files(*images, metadata=meta(**kw)), headers=keys[key])


def test_submit_poll_report_images(gateway):
    client, services, keys = gateway()
    with client:
        r = _submit(client, keys, png(seed=1), png(seed=2), options={"explain": True})
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        assert r.headers["Location"] == f"/v1/analyses/{aid}"
        body = wait_status(client.get, aid, keys["lis"])
        assert body["status"] == "succeeded", body
        res = body["result"]
        assert res["schema_version"] == "1.9" and res["n_images"] == 2
        assert res["input"] == "fields"
        assert 0 <= res["p_aml"] <= 1 and 0 <= res["p_npm1"] <= 1
        # P(NPM1) of the case is the mean of the per-image probabilities
        per = [im["p_npm1"] for im in res["images"]]
        assert res["p_npm1"] == pytest.approx(sum(per) / len(per))
        assert res["model_versions"]["npm1"]["version"] == "7"
        assert res["lineage"] == {"segmentation": "3", "celltype": "5"}
        counts = {d["code"]: d["count"] for d in res["differential"]}
        assert sum(counts.values()) == res["n_cells_counted"]
        for d in res["differential"]:
            assert d["ci_low"] <= d["fraction"] <= d["ci_high"]
        # every call used the pinned version
        assert services.clients.seen_versions["celltype"] == {"5"}
        assert all(c["importance"] is not None for im in res["images"] for c in im["cells"])

        rep = client.get(f"/v1/analyses/{aid}/report", headers=keys["reader"])
        assert rep.status_code == 200 and rep.json()["analysis_id"] == aid
        for kind in ("heatmap", "overlay"):
            img = client.get(f"/v1/analyses/{aid}/images/1/{kind}.png", headers=keys["reader"])
            assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert (
            client.get(
                f"/v1/analyses/{aid}/images/5/overlay.png", headers=keys["reader"]
            ).status_code
            == 404
        )

        page = client.get(
            "/v1/analyses", params={"accession": "ACC-0001", "limit": 1}, headers=keys["reader"]
        ).json()
        assert page["total"] == 1 and page["items"][0]["id"] == aid
        assert (
            client.get(
                "/v1/analyses", params={"accession": "other"}, headers=keys["reader"]
            ).json()["total"]
            == 0
        )

        audit = client.get("/v1/audit", headers=keys["admin"]).json()
        assert {"submit", "read", "report", "heatmap", "list"} <= {a["action"] for a in audit}

        schema = client.get("/v1/schemas/result").json()
        assert "schema_version" in schema["properties"]
        metrics = client.get("/metrics").text
        assert 'marrowscope_gateway_analyses{status="succeeded"} 1.0' in metrics
        assert 'marrowscope_gateway_stage_seconds_count{stage="segmentation"}' in metrics
        assert "ACC-0001" not in metrics


def test_no_heatmap_without_explain(gateway):
    client, _, keys = gateway()
    with client:
        aid = _submit(client, keys, png()).json()["id"]
        assert wait_status(client.get, aid, keys["lis"])["status"] == "succeeded"
        r = client.get(f"/v1/analyses/{aid}/images/0/heatmap.png", headers=keys["lis"])
        assert r.status_code == 404 and r.json()["error"] == "no_heatmap"


def test_idempotency(gateway):
    client, services, keys = gateway()
    with client:
        h = {**keys["lis"], "Idempotency-Key": "case-42"}
        a = client.post("/v1/analyses", files=files(png(seed=3), metadata=meta()), headers=h)
        b = client.post("/v1/analyses", files=files(png(seed=3), metadata=meta()), headers=h)
        assert a.status_code == 202 and b.status_code == 200
        assert a.json()["id"] == b.json()["id"]
        c = client.post("/v1/analyses", files=files(png(seed=4), metadata=meta()), headers=h)
        assert c.status_code == 409 and c.json()["error"] == "idempotency_conflict"
        d = client.post(
            "/v1/analyses", files=files(png(seed=3), metadata=meta(stain="Giemsa")), headers=h
        )
        assert d.status_code == 409
        page = client.get("/v1/analyses", headers=keys["lis"]).json()
        assert page["total"] == 1


def test_auth_401_403_429(gateway):
    client, _, keys = gateway(rate_limit_per_min="3")
    with client:
        assert client.get("/v1/analyses").status_code == 401
        bad = client.get("/v1/analyses", headers={"X-API-Key": "ms_nope_nope"})
        assert bad.status_code == 401 and bad.json()["error"] == "unauthenticated"
        forbidden = _submit(client, keys, png(), key="reader")
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
        auth = {"Authorization": "Bearer " + keys["lis"]["X-API-Key"]}
        codes = [client.get("/v1/analyses", headers=auth).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        last = client.get("/v1/analyses", headers=auth)
        assert int(last.headers["Retry-After"]) >= 1


def test_keys_are_hashed_and_revocable(gateway):
    from sqlalchemy import select

    from services.gateway.auth import revoke_key
    from services.gateway.db import ApiKey

    client, services, keys = gateway()
    secret = keys["lis"]["X-API-Key"]
    with services.sessions.begin() as session:
        rows = session.scalars(select(ApiKey)).all()
        assert all(secret.split("_", 2)[2] not in (r.key_hash + r.salt) for r in rows)
        revoke_key(session, key_id=secret.split("_")[1])
    with client:
        assert client.get("/v1/analyses", headers=keys["lis"]).status_code == 401


def test_abstain_on_too_few_cells(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_CELLS", "8")  # 7 nucleated + 1 RBC < MIN_CELLS 20
    client, services, keys = gateway()
    with client:
        aid = _submit(client, keys, png()).json()["id"]
        body = wait_status(client.get, aid, keys["lis"])
        assert body["status"] == "abstained"
        assert "too few cells" in body["reason"]
        res = body["result"]
        assert res["p_aml"] is None and res["p_npm1"] is None and res["aml_positive"] is None
        assert res["aml"]["status"] == "abstained" and res["aml"]["reason"] == "too_few_cells"
        assert "ensemble" not in services.clients.calls
        fhir = client.get(f"/v1/analyses/{aid}/report?format=fhir", headers=keys["lis"]).json()
        codes = {
            e["resource"].get("code", {}).get("coding", [{}])[0].get("code") for e in fhir["entry"]
        }
        assert "p-aml" not in codes and "counted-cells" in codes


@pytest.mark.parametrize("down", ["segmentation", "ensemble"])
def test_service_down_is_not_claimed_and_fails_after_the_requeue_window(gateway, monkeypatch, down):
    monkeypatch.setenv("MS_TEST_FAKE_DOWN", down)
    client, services, keys = gateway(requeue_window_s="1.5", ready_check_s="0.1")
    with client:
        aid = _submit(client, keys, png()).json()["id"]
        body = wait_status(client.get, aid, keys["lis"])
        assert body["status"] == "failed"
        assert body["reason"].startswith(f"model service(s) {down} not ready for longer than")
        assert body["result"] is None and body["started_at"] is None  # never claimed
        assert services.clients.calls == {}  # no attempt was burnt on the down service
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"][down] is False


def test_incompatible_lineage_fails(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_LINEAGE", "mismatch")
    client, _, keys = gateway()
    with client:
        aid = _submit(client, keys, png()).json()["id"]
        body = wait_status(client.get, aid, keys["lis"])
        assert body["status"] == "failed" and body["reason"].startswith("incompatible pipeline")
        assert "segmentation 1" in body["reason"]


def test_cancel_queued_and_running(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_SEG_DELAY_S", "1.0")
    client, _, keys = gateway()
    with client:
        first = _submit(client, keys, png(seed=1), png(seed=2)).json()["id"]
        second = _submit(client, keys, png(seed=3)).json()["id"]
        wait_status(client.get, first, keys["lis"], want={"running"})
        r = client.delete(f"/v1/analyses/{second}", headers=keys["lis"])
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        r = client.delete(f"/v1/analyses/{first}", headers=keys["lis"])
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        body = wait_status(client.get, first, keys["lis"])
        assert body["status"] == "cancelled" and body["result"] is None
        again = client.delete(f"/v1/analyses/{first}", headers=keys["lis"])
        assert again.status_code == 202
        assert client.delete("/v1/analyses/nope", headers=keys["lis"]).status_code == 404


def test_healthz_readyz(gateway):
    client, _, _ = gateway()
    with client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] is True


def test_metadata_round_trip(gateway):
    client, _, keys = gateway()
    with client:
        aid = _submit(client, keys, png(), specimen_type="peripheral_blood", stain="Wright").json()[
            "id"
        ]
        body = client.get(f"/v1/analyses/{aid}", headers=keys["lis"]).json()
        assert (body["specimen_type"], body["stain"]) == ("peripheral_blood", "Wright")
        assert json.loads(meta())["accession_id"] == body["accession_id"]


def test_deadline_fails_with_reason(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_SEG_DELAY_S", "5")
    client, _, keys = gateway(deadline_s="1")
    with client:
        aid = _submit(client, keys, png()).json()["id"]
        body = wait_status(client.get, aid, keys["lis"], timeout=10)
    assert body["status"] == "failed"
    assert body["reason"] == "deadline of 1 s exceeded while calling the segmentation service"


def test_explain_calls_are_chunked_to_the_service_box_cap(gateway):
    """The explain service refuses more than MAX_BOXES boxes per call: the gateway splits an
    image's cells into chunks and joins the importances (one per cell, in order)."""
    client, services, keys = gateway(explain_max_boxes="2")
    with client:
        r = _submit(client, keys, png(seed=3), options={"explain": True})
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], keys["lis"])
        assert body["status"] == "succeeded", body
        cells = body["result"]["images"][0]["cells"]
        assert len(cells) > 2
        assert all(c["importance"] is not None for c in cells)
        assert services.clients.calls["explain"] == -(-len(cells) // 2)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_images_of_a_case_are_analysed_at_most_image_concurrency_at_once(
    gateway, monkeypatch, concurrency
):
    """The per-case bound: several segmentation replicas can work on one case (a slide's
    tiles), never more than MS_GATEWAY_IMAGE_CONCURRENCY images at once; order is kept."""
    monkeypatch.setenv("MS_TEST_FAKE_SEG_DELAY_S", "0.05")
    client, services, keys = gateway(image_concurrency=str(concurrency))
    with client:
        r = _submit(client, keys, *(png(seed=s) for s in range(6)))
        body = wait_status(client.get, r.json()["id"], keys["lis"])
    assert body["status"] == "succeeded", body
    assert services.clients.max_segmenting == concurrency
    assert [im["index"] for im in body["result"]["images"]] == list(range(6))
