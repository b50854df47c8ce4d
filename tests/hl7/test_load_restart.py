"""Under load and across a restart: 200 orders over 8 connections each answered AA and each
analysis created once; a listener killed with messages in flight loses and doubles nothing
(the sender resends what was not ACKed, the placer order number makes that safe)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from marrowscope.paths import PROJECT_ROOT
from services.gateway.db import Analysis, Idempotency
from tests.conftest import free_port
from tests.gateway.conftest import settings_env
from tests.hl7.conftest import Client, inputs, msa, order
from tests.polling import wait_for

N_ORDERS, N_CONNECTIONS = 200, 8


def _count(services, model) -> int:
    with services.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_200_orders_over_8_connections_each_created_once(gateway, listen, tmp_path):
    root = tmp_path / "inputs"
    for k in range(4):
        inputs(root, f"ACC-{k}", seed=k)
    _client, services, _keys = gateway(embedded_worker=False)
    listener = listen(services.settings, input_root=root)

    def sender(c: int) -> list[tuple[str, str]]:
        client = Client(listener.port)
        got = []
        for k in range(c, N_ORDERS, N_CONNECTIONS):
            ack = client.send(order(f"PO-{k}", f"ACC-{k % 4}", control=f"C-{k}"))
            got.append((f"C-{k}", ack))
        client.close()
        return got

    with ThreadPoolExecutor(N_CONNECTIONS) as pool:
        acks = [a for part in pool.map(sender, range(N_CONNECTIONS)) for a in part]
    assert len(acks) == N_ORDERS
    ids = set()
    for control, ack in acks:
        fields = msa(ack)
        assert fields[1:3] == ["AA", control], ack
        ids.add(fields[3].split()[1])
    assert len(ids) == N_ORDERS
    assert _count(services, Analysis) == N_ORDERS == _count(services, Idempotency)


def _spawn(env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.hl7"],
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env},
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _connect(port: int, proc: subprocess.Popen) -> Client:
    def attempt():
        assert proc.poll() is None, "the listener exited"
        try:
            return Client(port)
        except OSError:
            return None

    return wait_for(attempt, "the listener's port", timeout=60)


def test_a_restart_with_messages_in_flight_loses_and_doubles_nothing(gateway, tmp_path):
    root = tmp_path / "inputs"
    inputs(root, "ACC-R")
    _client, services, _keys = gateway(embedded_worker=False)
    port = free_port()
    env = {
        **settings_env(tmp_path / "gw"),
        "MS_GATEWAY_EMBEDDED_WORKER": "false",
        "MS_HL7_PORT": str(port),
        "MS_HL7_INPUT_ROOT": str(root),
        "MS_HL7_SHUTDOWN_GRACE_S": "2",
    }
    messages = [order(f"PO-R{k}", "ACC-R", control=f"R-{k}") for k in range(12)]
    acked: dict[str, str] = {}
    with open(tmp_path / "hl7.log", "ab") as log:
        proc = _spawn(env, log)
        client = _connect(port, proc)
        for message in messages[:5]:
            ack = client.send(message)
            acked[msa(ack)[2]] = msa(ack)[3]
        # three more written without waiting for their ACKs, then the listener dies
        for message in messages[5:8]:
            client.write(b"\x0b" + message.encode() + b"\x1c\x0d")
        proc.kill()
        proc.wait(10)
        client.close()
        proc = _spawn(env, log)
        try:
            client = _connect(port, proc)
            # the sender resends every message not ACKed yet, then the rest
            for message in messages:
                control = message.split("\r", 1)[0].split("|")[9]
                if control in acked:
                    continue
                ack = client.send(message)
                assert msa(ack)[1] == "AA", ack
                acked[control] = msa(ack)[3]
            client.close()
        finally:
            proc.terminate()
            proc.wait(30)
    assert len(acked) == len(messages)
    assert len({text.split()[1] for text in acked.values()}) == len(messages)
    assert _count(services, Analysis) == len(messages) == _count(services, Idempotency)
