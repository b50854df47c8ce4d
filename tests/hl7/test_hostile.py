"""Hostile and broken peers get a NACK or a closed connection, never a crash: the listener
answers a good order afterwards, and nothing half-made is left behind."""

from __future__ import annotations

import socket
import time

from sqlalchemy import func, select

from services.gateway.db import Analysis
from tests.conftest import free_port
from tests.hl7.conftest import END, START, Client, err, inputs, msa, order


def test_hostile_peers_are_closed_and_the_listener_carries_on(gateway, listen, tmp_path):
    root = tmp_path / "inputs"
    inputs(root, "ACC-1")
    _client, services, _keys = gateway(embedded_worker=False)
    listener = listen(
        services.settings,
        input_root=root,
        max_message_bytes=4096,
        read_timeout_s=0.5,
        idle_timeout_s=1.0,
        max_connections=3,
        metrics_port=free_port(),
    )
    port = listener.port

    # bytes outside a frame: closed at once
    garbage = Client(port)
    garbage.write(b"GET / HTTP/1.1\r\n\r\n")
    assert garbage.closed_within(5)

    # a start byte inside a message: closed (no frame to answer)
    nested = Client(port)
    nested.write(START + b"MSH|^~\\&|half" + START + order().encode() + END)
    assert nested.closed_within(5)

    # oversized: AR naming the limit and the MSH-10, then closed
    big = Client(port)
    big.write(START + order(control="BIG-1").encode() + b"\rNTE|1||" + b"x" * 8000 + END)
    ack = big.read_ack()
    assert msa(ack)[1:3] == ["AR", "BIG-1"] and "4096 bytes" in err(ack)[8]
    assert big.closed_within(5)

    # slow-loris: half a message, then nothing; closed at the read deadline, not later
    slow = Client(port)
    slow.write(START + order().encode()[:40])
    t0 = time.monotonic()
    assert slow.closed_within(10)
    assert time.monotonic() - t0 < 5

    # half-open: connected, silent; closed at the idle timeout
    idle = Client(port)
    assert idle.closed_within(10)

    # connection cap: with 3 open, a 4th is closed at once
    held = [Client(port) for _ in range(3)]
    for c in held:  # each is answered, so each is really open on the server
        assert msa(c.send(order(placer="PO-CAP", control="CAP")))[1] == "AA"
    extra = Client(port)
    assert extra.closed_within(5)
    for c in held:
        c.close()

    # a peer that vanishes mid-message leaves nothing behind
    gone = socket.create_connection(("127.0.0.1", port))
    gone.sendall(START + order(placer="PO-GONE", control="GONE").encode()[:-10])
    gone.close()

    good = Client(port)
    assert msa(good.send(order(placer="PO-OK", control="OK")))[1] == "AA"
    good.close()
    with services.sessions() as session:
        n = session.scalar(select(func.count()).select_from(Analysis))
    assert n == 2  # PO-CAP (three times, one analysis) and PO-OK; nothing of PO-GONE
    sample = listener_metric(listener, "marrowscope_hl7_connections_closed_total")
    for reason in ("framing", "oversized", "read_timeout", "idle", "connection_cap"):
        assert sample(reason=reason) >= 1, reason


def listener_metric(listener, name):
    """A sampler of the listener's metric `name` as its metrics port serves it now."""
    import urllib.request

    port = listener.settings.metrics_port
    assert port, "the hostile test starts the listener with a metrics port"
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def sample(**labels) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}}"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    return sample
