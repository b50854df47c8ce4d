"""Issue 22 (second round): what a hostile HTTP client found, against one real gateway process
on loopback (fake model clients, no worker) reached over real sockets.

Single-cell cases at the documented maximum, one error code per limit (the generated table in
docs/SERVICES.md), failed authentications that never lock out a valid key (and
X-Forwarded-For only from a trusted proxy), stalled and abandoned uploads, the JSON shape of
uvicorn's own 400, route labels and the latency histogram, and operational detail behind the
`ops` scope or the metrics port."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from services.gateway.errors import LIMITS
from tests.gateway.conftest import create_key_cli, files, meta, settings_env
from tests.polling import wait_for

PROXY = "127.0.0.2"
"""The trusted proxy: the tests reach the gateway from this loopback address to be a proxy,
from 127.0.0.1 to be any other client."""
MAX_REQUEST = 2_000_000
MAX_SLIDE = 3_000_000
IDLE_S = 3.0
"""Short for the test, long enough that a loaded machine never stalls a real upload so long."""


def _png(w: int, h: int, value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value, value // 2, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.conftest import free_port
    from tests.gateway.conftest import GatewayProcess

    tmp = tmp_path_factory.mktemp("hardening")
    env = settings_env(
        tmp / "gw",
        MS_GATEWAY_OPS_PUBLIC="false",
        MS_GATEWAY_EMBEDDED_WORKER="false",
        MS_GATEWAY_TRUSTED_PROXIES=PROXY,
        MS_GATEWAY_AUTH_FAILURES_PER_MIN="5",
        MS_GATEWAY_RATE_LIMIT_PER_MIN="25",
        MS_GATEWAY_BODY_IDLE_TIMEOUT_S=str(IDLE_S),
        MS_GATEWAY_MAX_REQUEST_BYTES=str(MAX_REQUEST),
        MS_GATEWAY_MAX_SLIDE_BYTES=str(MAX_SLIDE),
        MS_GATEWAY_MAX_UPLOAD_BYTES="200000",
        MS_GATEWAY_MAX_IMAGES="3",
        MS_GATEWAY_MAX_PIXELS="4000000",
        MS_GATEWAY_MAX_CASE_PIXELS="5000000",
        MS_GATEWAY_METRICS_PORT=str(free_port()),
    )
    keys = {
        "lis": create_key_cli(env, "submit,read"),
        "ops": create_key_cli(env, "ops"),
        "rate": create_key_cli(env, "read"),
    }
    proc = GatewayProcess(env, free_port(), log=tmp / "gw.log")
    try:
        proc.wait_healthy()
        yield proc, keys, env, tmp
    finally:
        proc.stop()


def _client(proc, source: str = "127.0.0.1") -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=proc.url, transport=transport, timeout=60)


def _raw(proc, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=60)
    sock.sendall(head.encode() + body)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _metrics(proc, keys) -> str:
    with _client(proc) as c:
        r = c.get("/metrics", headers={"X-API-Key": keys["ops"]})
    assert r.status_code == 200, r.text
    return r.text


def test_single_cell_case_at_the_documented_maximum_is_accepted(live):
    """MS_GATEWAY_MAX_CELL_IMAGES is 2000; the multipart parser's own default of 1,000
    files had answered 400 "Too many files"."""
    proc, keys, _, _ = live
    cell = _png(32, 32)
    with _client(proc) as c:
        r = c.post(
            "/v1/analyses",
            files=files(*[cell] * 2000, metadata=meta(input="cells")),
            headers={"X-API-Key": keys["lis"]},
        )
    assert r.status_code == 202, r.text


def _slide_put(proc, key: str, declared: int, sent: bytes) -> socket.socket:
    head = (
        "PUT /v1/slide-uploads?name=s.tiff HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-API-Key: {key}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    return _raw(proc, head, sent)


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _part_files(env) -> list[Path]:
    return list(Path(env["MS_GATEWAY_DATA_DIR"]).rglob("*.part"))


def test_every_limit_answers_with_its_documented_code(live):
    """Each limit in `errors.LIMITS` (the table in docs/SERVICES.md) is produced against the
    running gateway with its own code and its setting named in the detail."""
    proc, keys, env, _ = live
    lis = {"X-API-Key": keys["lis"]}
    seen: dict[str, tuple[int, str, str]] = {}

    def record(setting: str, r: httpx.Response) -> None:
        assert "error" in r.json(), (setting, r.status_code, r.text[:300])
        seen[setting] = (r.status_code, r.json()["error"], r.json()["detail"])

    cell, field = _png(32, 32), _png(64, 64)
    with _client(proc) as c:
        post = lambda *ims, **m: c.post(  # noqa: E731
            "/v1/analyses", files=files(*ims, metadata=meta(**m)), headers=lis
        )
        for setting, method, path, declared in (
            ("MS_GATEWAY_MAX_REQUEST_BYTES", "POST", "/v1/analyses", MAX_REQUEST + 1),
            ("MS_GATEWAY_MAX_SLIDE_BYTES", "PUT", "/v1/slide-uploads?name=s.tiff", MAX_SLIDE + 1),
        ):  # declared only: the body is never sent, the answer comes from the headers
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {keys['lis']}\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            )
            with _raw(proc, head) as sock:
                status, body = _status_and_json(_read_all(sock))
            seen[setting] = (status, body["error"], body["detail"])
        record("MS_GATEWAY_MAX_UPLOAD_BYTES", post(field + b"\0" * 200_001))
        record("MS_GATEWAY_MAX_IMAGES", post(*[field] * 4))
        record("MS_GATEWAY_MAX_CELL_IMAGES", post(*[cell] * 2001, input="cells"))
        big = _png(2000, 1500)
        record("MS_GATEWAY_MAX_CASE_PIXELS", post(big, big))
        r = c.post(
            "/v1/analyses",
            files=[("images", ("a.png", field, "image/png")), ("metadata", (None, "x" * 17_000))],
            headers=lis,
        )
        record("MS_GATEWAY_MAX_METADATA_BYTES", r)
        record("MS_GATEWAY_MAX_PIXELS", post(_png(2100, 2000)))
        record("MS_GATEWAY_MAX_CELL_IMAGE_PIXELS", post(_png(1100, 1000), input="cells"))
        # the bucket refills while we ask (25 a minute): ask until it is empty, not 26 times
        for _ in range(200):
            r = c.get("/v1/analyses", headers={"X-API-Key": keys["rate"]})
            if r.status_code != 200:
                break
        record("MS_GATEWAY_RATE_LIMIT_PER_MIN", r)
        for _ in range(60):  # 5 a minute, refilling while we ask
            r = c.get("/v1/analyses", headers={"X-API-Key": "ms_guess_guess"})
            if r.status_code != 401:
                break
        record("MS_GATEWAY_AUTH_FAILURES_PER_MIN", r)
    # a slide upload that stalls: 408 after the idle timeout, the partial file removed
    with _slide_put(proc, keys["lis"], 2_000_000, b"\1" * 500_000) as sock:
        status, body = _status_and_json(_read_all(sock))
    seen["MS_GATEWAY_BODY_IDLE_TIMEOUT_S"] = (status, body["error"], body["detail"])

    for limit in LIMITS:
        status, code, detail = seen[limit.setting]
        assert (status, code) == (limit.status, limit.code), (limit, detail)
        assert limit.setting in detail, (limit, detail)
    assert _part_files(env) == []
    assert "marrowscope_gateway_body_timeouts_total" in _metrics(proc, keys)


def _until_refused(ask: Callable[[int], httpx.Response], most: int = 60) -> list[int]:
    """Statuses of `ask(k)` until the first 429. The buckets refill while we ask (5 a
    minute), so a count of requests would depend on the machine's speed."""
    statuses: list[int] = []
    for k in range(most):
        statuses.append(ask(k).status_code)
        if statuses[-1] == 429:
            break
    return statuses


def test_failures_of_others_never_lock_out_a_valid_key(live):
    proc, keys, _, _ = live
    with _client(proc, source=PROXY) as proxy, _client(proc) as direct:
        a = {"X-Forwarded-For": "203.0.113.5"}
        keyless = _until_refused(lambda _: proxy.get("/v1/analyses", headers=a))
        assert keyless[-1] == 429 and set(keyless[:-1]) == {401} and len(keyless) >= 6
        # the same address with a valid key: never refused for the failures
        assert proxy.get("/v1/analyses", headers={**a, "X-API-Key": keys["lis"]}).status_code == 200
        # another client behind the same proxy has its own count
        b = {"X-Forwarded-For": "203.0.113.6"}
        assert proxy.get("/v1/analyses", headers=b).status_code == 401
        # one guessed key from ever new addresses is limited as a credential
        guessed = _until_refused(
            lambda k: proxy.get(
                "/v1/analyses",
                headers={"X-Forwarded-For": f"198.51.100.{k}", "X-API-Key": "ms_abc_def"},
            )
        )
        assert guessed[-1] == 429 and set(guessed[:-1]) == {401} and len(guessed) >= 6
        # X-Forwarded-For from a peer that is not a trusted proxy is ignored: these all
        # count against 127.0.0.1, whatever address they name (honoured, each would have
        # its own count and none would ever be refused)
        spoofed = _until_refused(
            lambda k: direct.get("/v1/analyses", headers={"X-Forwarded-For": f"192.0.2.{k}"})
        )
        assert spoofed[-1] == 429, spoofed
        assert direct.get("/v1/analyses", headers={"X-API-Key": keys["lis"]}).status_code == 200


def test_abandoned_upload_is_an_info_event_and_bad_framing_gets_the_error_shape(live):
    proc, keys, env, tmp = live
    sock = _slide_put(proc, keys["lis"], 2_000_000, b"\1" * 100_000)
    sock.close()  # the client goes away mid-body
    wait_for(
        lambda: "marrowscope_gateway_client_disconnects_total{" in _metrics(proc, keys),
        "the disconnect counter",
    )
    log = (tmp / "gw.log").read_text()
    assert "client disconnected: PUT /v1/slide-uploads" in log
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert _part_files(env) == []
    # a body longer than its Content-Length: uvicorn answers the excess itself, as JSON
    with _raw(
        proc,
        "POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n",
        b"hello" + b"this is not an HTTP request\r\n\r\n",
    ) as sock:
        raw = _read_all(sock)
    last = raw[raw.rindex(b"HTTP/1.1 ") :]
    status, body = _status_and_json(last)
    assert status == 400 and set(body) == {"error", "detail"}, raw


def test_routes_are_labelled_and_timed(live):
    proc, keys, _, _ = live
    with _client(proc) as c:
        for path in ("/openapi.json", "/docs", "/docs/assets/swagger-ui.css", "/no/such/route"):
            c.get(path)
    text = _metrics(proc, keys)
    for route in ("/openapi.json", "/docs", "/docs/assets/{path:path}"):
        assert (
            f'marrowscope_gateway_http_request_duration_seconds_count{{method="GET",'
            f'route="{route}",status_class="2xx"}}'
        ) in text, route
    assert 'route="unrouted",status_class="4xx"' in text
    assert 'route="unrouted",status_class="2xx"' not in text


def test_operational_detail_needs_the_ops_scope_or_the_metrics_port(live):
    proc, keys, env, _ = live
    with _client(proc) as c:
        bare = c.get("/readyz")
        detail = c.get("/readyz", headers={"X-API-Key": keys["ops"]})
        anonymous = c.get("/metrics")
        wrong_scope = c.get("/metrics", headers={"X-API-Key": keys["lis"]})
    assert set(bare.json()) == {"ready"}, bare.text
    assert {"ready", "database", "models"} <= set(detail.json()), detail.text
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthenticated"
    assert wrong_scope.status_code == 403
    port = env["MS_GATEWAY_METRICS_PORT"]
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert scraped.status_code == 200
    assert "marrowscope_gateway_http_request_duration_seconds" in scraped.text
