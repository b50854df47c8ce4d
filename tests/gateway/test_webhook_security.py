"""Webhooks cannot reach loopback, private, link-local or metadata destinations unless the
deployment allows them, checked at submit and again on the resolved address at send time;
URLs are logged as scheme://host only. Real HTTP listeners on loopback."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import logging
import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from services.gateway.db import Analysis, Outbox
from services.gateway.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookPolicy,
    deliver,
    redact_url,
    verify,
)
from tests.gateway.conftest import SECRET, files, meta, png, wait_status


class _Listener:
    """A real HTTP server on 127.0.0.1 recording what it receives."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    lst = _Listener()
    yield lst
    lst.close()


REFUSED = [
    "http://127.0.0.1:{port}/hook",
    "http://10.0.0.7/hook",
    "http://192.168.1.20/hook",
    "http://172.16.0.1/hook",
    "http://[::1]:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0x7f000001:{port}/hook",
    "http://127.1:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://localhost:{port}/hook",
    "http://[::ffff:127.0.0.1]/hook",
    # IPv6 transition forms of a private v4 host (issue 22 probe): NAT64, 6to4, v4-compatible
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b::a00:1]/hook",
    "http://[64:ff9b::7f00:1]:{port}/hook",
    "http://[2002:a9fe:a9fe::1]/hook",
    "http://[::a9fe:a9fe]/hook",
    "http://user:hunter2@lis.example/hook",
]


@pytest.mark.parametrize("template", REFUSED)
def test_private_loopback_metadata_and_credentials_refused_at_submit(gateway, listener, template):
    client, services, keys = gateway()
    url = template.format(port=listener.port)
    with client:
        r = client.post(
            "/v1/analyses", files=files(png(), metadata=meta(webhook_url=url)), headers=keys["lis"]
        )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "webhook_url_refused"
    assert "hunter2" not in r.json()["detail"]
    with services.sessions() as session:
        assert session.scalars(select(Analysis)).first() is None
    assert listener.received == []


def _outbox(services) -> Outbox | None:
    with services.sessions() as session:
        return session.scalars(select(Outbox)).first()


def _wait_outbox(services, done, timeout: float = 30.0) -> Outbox:
    end = time.monotonic() + timeout
    row = None
    while time.monotonic() < end:
        row = _outbox(services)
        if row is not None and done(row):
            return row
        time.sleep(0.05)
    raise AssertionError(f"outbox row not done: {row and (row.status, row.last_error)}")


def test_a_name_resolving_to_loopback_is_refused_at_send_time(gateway, listener):
    name = socket.gethostname()
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, listener.port)}
    except OSError:
        pytest.skip(f"this machine's hostname {name!r} does not resolve")
    if any(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        pytest.skip(f"hostname {name!r} resolves to a public address here")
    client, services, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(png(), metadata=meta(webhook_url=f"http://{name}:{listener.port}/h")),
            headers=keys["lis"],
        )
        assert r.status_code == 202, r.text  # a name is not resolved at submit
        wait_status(client.get, r.json()["id"], keys["lis"])
        row = _wait_outbox(services, lambda o: o.attempts >= 1)
    assert row.status != "delivered" and row.last_error.startswith("refused: ")
    assert "resolves to a non-public address" in row.last_error
    assert listener.received == []


def test_allow_list_lets_a_private_lis_receive_and_logs_no_path_or_secret(
    gateway, listener, caplog
):
    client, services, keys = gateway(webhook_allow_cidrs="127.0.0.0/8")
    url = f"http://127.0.0.1:{listener.port}/lis/hook?token=s3cr3t-token"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="httpx")  # an earlier test may have quietened it
    with client:
        r = client.post(
            "/v1/analyses", files=files(png(), metadata=meta(webhook_url=url)), headers=keys["lis"]
        )
        assert r.status_code == 202, r.text
        wait_status(client.get, r.json()["id"], keys["lis"])
        row = _wait_outbox(services, lambda o: o.status == "delivered")
    assert row.status == "delivered"
    path, headers, body = listener.received[0]
    assert path == "/lis/hook?token=s3cr3t-token"
    assert headers["Host"] == f"127.0.0.1:{listener.port}"
    assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"http://127.0.0.1:{listener.port}" in logged  # httpx's request line, redacted
    assert "s3cr3t" not in logged and "/lis/hook" not in logged


def _deliver(url: str, policy: WebhookPolicy) -> tuple[bool, str | None]:
    async def go():
        async with httpx.AsyncClient(follow_redirects=False) as client:
            return await deliver(
                client, url=url, body=b"{}", event_id="e1", secret=SECRET, timeout=5, policy=policy
            )

    return asyncio.run(go())


def _resolver(*answers: list[str]):
    calls = iter(answers)

    async def resolve(host: str, port: int) -> list[str]:
        return next(calls)

    return resolve


def test_send_time_check_uses_the_resolved_address_and_connects_to_it(listener):
    url = f"http://lis.example:{listener.port}/hook"
    # rebinding: a public answer mixed with loopback, or loopback at send time
    for answer in (
        ["93.184.216.34", "127.0.0.1"],
        ["127.0.0.1"],
        ["::1"],
        ["169.254.169.254"],
        ["64:ff9b::7f00:1"],  # NAT64 of 127.0.0.1
        ["2002:a9fe:a9fe::1"],  # 6to4 of 169.254.169.254
        ["::a00:1"],  # IPv4-compatible 10.0.0.1
        ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],  # Teredo, client 192.0.2.45
    ):
        ok, err = _deliver(url, WebhookPolicy(resolve=_resolver(answer)))
        assert not ok and err.startswith("refused: ") and "non-public" in err, (answer, err)
    assert listener.received == []
    # a public v4 host in a transition address stays reachable
    assert WebhookPolicy().allowed(ipaddress.ip_address("64:ff9b::5db8:d822"))
    assert WebhookPolicy().allowed(ipaddress.ip_address("2002:5db8:d822::1"))
    # allowed network: the POST goes to the checked address (lis.example has no DNS record
    # here, so a second lookup by the HTTP client would have failed) with the name as Host
    allowed = WebhookPolicy(
        allow=(ipaddress.ip_network("127.0.0.0/8"),), resolve=_resolver(["127.0.0.1"])
    )
    ok, err = _deliver(url, allowed)
    assert ok, err
    assert listener.received[0][1]["Host"] == f"lis.example:{listener.port}"


def test_allow_private_switch_and_bad_allow_list(make_settings, listener):
    settings = make_settings(allow_private_webhooks="true")
    ok, err = _deliver(f"http://127.0.0.1:{listener.port}/h", WebhookPolicy.from_settings(settings))
    assert ok, err
    assert make_settings().allow_private_webhooks is False
    with pytest.raises(ValueError, match="not an IP network"):
        make_settings(webhook_allow_cidrs="10.0.0.0/8, lis.example")


def test_redact_url():
    line = 'HTTP Request: POST http://u:p@lis.example:8443/a/b?acc=ACC-1 "HTTP/1.1 204"'
    assert redact_url(line) == 'HTTP Request: POST http://lis.example:8443 "HTTP/1.1 204"'
    assert redact_url("https://lis.example/x") == "https://lis.example"
