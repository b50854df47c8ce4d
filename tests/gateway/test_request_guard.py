"""What the gateway decides before it reads a body, and the shape of every error.

A real gateway process and raw sockets check that a 300 MB upload without a key, or over
the request limit, is answered without the body ever being sent; in-process tests cover the
case pixel budget, the failed-authentication limit, the Host header, framework errors,
HEAD, local Swagger UI assets and the rejection counters."""

from __future__ import annotations

import json
import socket
import time

import pytest
from sqlalchemy import func, select

from services.gateway.db import Analysis
from tests.gateway.conftest import create_key_cli, files, meta, png, settings_env, wait_status

BOUNDARY = "msboundary"


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict, dict]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body[:length] or b"{}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real gateway process (fake model clients) with a 2 MB request limit."""
    from tests.conftest import free_port
    from tests.gateway.conftest import GatewayProcess

    tmp = tmp_path_factory.mktemp("guard")
    env = settings_env(tmp / "gw", MS_GATEWAY_MAX_REQUEST_BYTES=str(2_000_000))
    key = create_key_cli(env)
    port = free_port()
    proc = GatewayProcess(env, port, log=tmp / "gw.log")
    try:
        proc.wait_healthy()
        yield proc, key, tmp
    finally:
        proc.stop()


def _connect(proc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proc.port), timeout=10)


@pytest.mark.parametrize("key", [None, "ms_nope_nope"])
def test_upload_without_a_valid_key_gets_401_before_its_body_is_sent(live, key):
    proc, _, _ = live
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(300_000_000),
        **({"X-API-Key": key} if key else {}),
    }
    with _connect(proc) as sock:
        sock.sendall(_head("/v1/analyses", headers))  # not one byte of the 300 MB follows
        status, resp_headers, body = _response(sock)
    assert status == 401 and body["error"] == "unauthenticated", body
    assert resp_headers["www-authenticate"] == "Bearer"


def test_declared_oversize_gets_413_before_its_body_is_sent(live):
    proc, key, _ = live
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(300_000_000),
        "X-API-Key": key,
    }
    with _connect(proc) as sock:
        sock.sendall(_head("/v1/analyses", headers))
        status, _, body = _response(sock)
    assert status == 413 and body["error"] == "request_too_large", body
    assert "300000000 bytes; the limit is 2000000" in body["detail"]


def test_streamed_oversize_gets_413_at_the_limit(live):
    """Chunked transfer declares no length: the count while streaming stops it."""
    proc, key, tmp = live
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Transfer-Encoding": "chunked",
        "X-API-Key": key,
    }
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    sent = 0
    status = None
    with _connect(proc) as sock:
        sock.sendall(_head("/v1/analyses", headers))
        chunk = part + b"\0" * (256 * 1024)
        try:
            while sent < 20_000_000:  # 10x the limit: the server must stop us before
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                chunk = b"\0" * (256 * 1024)
                sock.settimeout(0.01)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except (TimeoutError, BlockingIOError):
                    pass
                sock.settimeout(10)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = _response(sock)
    assert status == 413 and body["error"] == "request_too_large", body
    assert sent < 10_000_000, f"the server read {sent} bytes past a 2 MB limit"


def test_case_pixel_budget_refused_from_headers(gateway):
    client, services, keys = gateway(max_case_pixels=str(96 * 72 * 2))
    with client:
        ok = client.post(
            "/v1/analyses",
            files=files(png(seed=1), png(seed=2), metadata=meta()),
            headers=keys["lis"],
        )
        over = client.post(
            "/v1/analyses",
            files=files(png(seed=3), png(seed=4), png(seed=5), metadata=meta()),
            headers=keys["lis"],
        )
    assert ok.status_code == 202, ok.text
    assert over.status_code == 413 and over.json()["error"] == "case_too_large", over.text
    assert "MS_GATEWAY_MAX_CASE_PIXELS" in over.json()["detail"]
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Analysis)) == 1


def test_failed_authentications_are_limited_per_address(gateway):
    client, _, keys = gateway(auth_failures_per_min="5")
    with client:
        bad = [client.get("/v1/analyses", headers={"X-API-Key": "ms_x_y"}) for _ in range(5)]
        blocked = client.get("/v1/analyses", headers={"X-API-Key": "ms_x_z"})
        valid = client.get("/v1/analyses", headers=keys["lis"])  # same address, valid key
        health = client.get("/healthz")
        metrics = client.get("/metrics").text
    assert [r.status_code for r in bad] == [401] * 5
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert blocked.json()["error"] == "too_many_failed_authentications"
    # a valid key is never refused for failures of others at its address (issue 22 §4)
    assert valid.status_code == 200 and health.status_code == 200
    assert (
        'marrowscope_gateway_rejected_requests_total{route="/v1/analyses",status="401"} 5.0'
        in metrics
    )
    # refused before routing, labelled with the route all the same
    assert (
        'marrowscope_gateway_rejected_requests_total{route="/v1/analyses",status="429"} 1.0'
        in metrics
    )


def test_report_urls_come_from_the_configured_base_url_not_the_host_header(gateway):
    def media_urls(client, keys, aid):
        rep = client.get(
            f"/v1/analyses/{aid}/report",
            params={"format": "fhir"},
            headers={**keys["lis"], "Host": "evil.example"},
        )
        assert rep.status_code == 200
        return [
            e["resource"]["content"]["url"]
            for e in rep.json()["entry"]
            if e["resource"]["resourceType"] == "Media"
        ]

    for base, want in (("", ""), ("https://ms.hospital.example/", "https://ms.hospital.example")):
        client, _, keys = gateway(public_base_url=base)
        with client:
            r = client.post(
                "/v1/analyses", files=files(png(), metadata=meta()), headers=keys["lis"]
            )
            aid = r.json()["id"]
            wait_status(client.get, aid, keys["lis"])
            urls = media_urls(client, keys, aid)
        assert urls == [f"{want}/v1/analyses/{aid}/images/0/overlay.png"]
        assert not any("evil" in u for u in urls)


def test_bad_public_base_url_is_refused(make_settings):
    with pytest.raises(ValueError, match="PUBLIC_BASE_URL"):
        make_settings(public_base_url="ms.hospital.example")


def test_framework_errors_use_the_api_error_shape(gateway):
    client, _, keys = gateway()
    with client:
        unknown = client.get("/v1/nothing-here", headers=keys["lis"])
        method = client.put("/v1/analyses", headers=keys["lis"])
        malformed = client.post(  # multipart without a boundary cannot be parsed
            "/v1/analyses",
            content=b"--x\r\nabc",
            headers={**keys["lis"], "Content-Type": "multipart/form-data"},
        )
        metrics = client.get("/metrics").text
    for resp, status, code in (
        (unknown, 404, "not_found"),
        (method, 405, "method_not_allowed"),
        (malformed, 400, "bad_request"),
    ):
        assert resp.status_code == status, resp.text
        assert set(resp.json()) == {"error", "detail"} and resp.json()["error"] == code
    assert 'marrowscope_gateway_rejected_requests_total{route="unrouted",status="404"}' in metrics


def test_head_is_answered_where_get_is(gateway):
    client, _, keys = gateway()
    with client:
        r = client.post("/v1/analyses", files=files(png(), metadata=meta()), headers=keys["lis"])
        aid = r.json()["id"]
        get = client.get(f"/v1/analyses/{aid}", headers=keys["lis"])
        head = client.head(f"/v1/analyses/{aid}", headers=keys["lis"])
        health = client.head("/healthz")
        schema = client.get("/openapi.json").json()
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert health.status_code == 200
    assert not any("head" in ops for ops in schema["paths"].values())


def test_swagger_ui_is_served_without_a_cdn(gateway):
    client, _, _ = gateway()
    with client:
        page = client.get("/docs")
        js = client.get("/docs/assets/swagger-ui-bundle.js")
        css = client.get("/docs/assets/swagger-ui.css")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert js.status_code == 200 and len(js.content) > 100_000
    assert css.status_code == 200


def test_every_response_is_counted(gateway):
    client, _, keys = gateway()
    with client:
        client.get("/v1/analyses", headers=keys["lis"])
        time.sleep(0)
        metrics = client.get("/metrics").text
    assert (
        'marrowscope_gateway_http_requests_total{code="200",method="GET",route="/v1/analyses"} 1.0'
        in metrics
    )
