"""ORU^R01 delivery over MLLP from the durable outbox to a real MLLP receiver on loopback:
ACKed and done; a LIS that is down gets everything, in order, once back; AE retried, AR
parked (and requeued by a person)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from sqlalchemy import select

from services.gateway import hl7outbox
from services.gateway.db import AuditLog, Hl7Outbox
from services.gateway.mllp import Hl7Destination, MllpError, send
from tests.conftest import free_port
from tests.gateway.conftest import files, meta, png, wait_status
from tests.gateway.mllp_server import MllpServer, self_signed
from tests.polling import wait_for

BASE_URL = "https://marrowscope.example"


def _destinations(port: int, **extra) -> dict:
    return {"default": {"host": "127.0.0.1", "port": port, "ack_timeout_s": 5, **extra}}


def _submit(client, keys, seed: int) -> str:
    r = client.post(
        "/v1/analyses", files=files(png(seed=seed), metadata=meta()), headers=keys["lis"]
    )
    assert r.status_code == 202, r.text
    aid = r.json()["id"]
    assert wait_status(client.get, aid, keys["lis"])["status"] == "succeeded"
    return aid


def _rows(services) -> list[Hl7Outbox]:
    with services.sessions() as session:
        rows = list(
            session.scalars(select(Hl7Outbox).order_by(Hl7Outbox.created_at, Hl7Outbox.seq))
        )
        session.expunge_all()
        return rows


def _msh10(message: str) -> str:
    return message.split("\r", 1)[0].split("|")[9]


def _counter(services, outcome: str) -> float:
    value = services.metrics.registry.get_sample_value(
        "marrowscope_gateway_hl7_messages_total", {"outcome": outcome}
    )
    return value or 0.0


def test_result_is_delivered_and_acked(gateway):
    with MllpServer() as lis:
        client, services, keys = gateway(
            hl7_destinations=_destinations(lis.port), public_base_url=BASE_URL
        )
        with client:
            aid = _submit(client, keys, seed=3)
            (row,) = wait_for(
                lambda: [r for r in _rows(services) if r.status == "delivered"], "delivery"
            )
    (message,) = lis.messages()
    assert "|ORU^R01^ORU_R01|" in message and _msh10(message) == row.control_id
    assert f"|{aid}^MARROWSCOPE|" in message
    assert f"{BASE_URL}/v1/analyses/{aid}/report?format=pdf" in message.replace("\\T\\", "&")
    assert row.analysis_id == aid and row.attempts == 1 and "MSA|AA|" in row.ack
    with services.sessions() as session:
        audit = list(session.scalars(select(AuditLog).where(AuditLog.action == "hl7_send")))
    assert [a.resource for a in audit] == [aid] and "delivered" in audit[0].detail
    assert _counter(services, "delivered") == 1


def test_lis_down_then_back_gets_everything_in_order(gateway):
    port = free_port()
    client, services, keys = gateway(hl7_destinations=_destinations(port))
    with client:
        first = _submit(client, keys, seed=4)
        # a second message of the same analysis (the sign-out, once the review app exists)
        with services.sessions.begin() as session:
            hl7outbox.enqueue(session, analysis_id=first, tenant="default", event="signed_out")
        second = _submit(client, keys, seed=5)
        wait_for(
            lambda: any(r.attempts >= 1 and r.status == "pending" for r in _rows(services)),
            "a failed attempt while the LIS is down",
        )
        assert all(r.status == "pending" for r in _rows(services))
        with MllpServer(port) as lis:
            wait_for(
                lambda: all(r.status == "delivered" for r in _rows(services)),
                "delivery after the LIS is back",
            )
    rows = {(r.analysis_id, r.seq): r for r in _rows(services)}
    assert set(rows) == {(first, 1), (first, 2), (second, 1)}
    got = [_msh10(m) for m in lis.messages()]
    order = [c for c in got if c in (rows[(first, 1)].control_id, rows[(first, 2)].control_id)]
    assert order == [rows[(first, 1)].control_id, rows[(first, 2)].control_id]
    assert _counter(services, "retry") >= 1


def test_application_error_is_retried_and_reject_parked(gateway):
    answers = iter(["AE", "AA"])
    with MllpServer(answer=lambda _m: next(answers)) as lis:
        client, services, keys = gateway(hl7_destinations=_destinations(lis.port))
        with client:
            _submit(client, keys, seed=6)
            (row,) = wait_for(
                lambda: [r for r in _rows(services) if r.status == "delivered"], "delivery after AE"
            )
    assert (row.attempts, row.error_answers) == (2, 1)
    assert len(lis.messages()) == 2 and lis.messages()[0] == lis.messages()[1]  # resent as is

    code = ["AR"]
    with MllpServer(answer=lambda _m: code[0]) as lis:
        client, services, keys = gateway(hl7_destinations=_destinations(lis.port))
        with client:
            _submit(client, keys, seed=7)
            (row,) = wait_for(
                lambda: [r for r in _rows(services) if r.status == "parked"], "parking after AR"
            )
            assert row.attempts == 1 and "AR" in row.last_error
            assert f"MSA|AR|{row.control_id}" in row.ack and row.message == lis.messages()[0]
            assert _counter(services, "parked") == 1
            code[0] = "AA"
            with services.sessions.begin() as session:
                assert hl7outbox.requeue(session, outbox_id=row.id)
            # the same row: the first part's delivered row shares this gateway's database
            wait_for(
                lambda: [r for r in _rows(services) if r.id == row.id and r.status == "delivered"],
                "delivery after requeue",
            )
    assert len(lis.messages()) == 2


def test_mllp_over_tls_checks_the_receivers_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    message = "MSH|^~\\&|MARROWSCOPE||||20261207120000||ORU^R01^ORU_R01|CTRL1|P|2.5.1"
    with MllpServer(tls=server_tls) as lis:
        trusted = Hl7Destination(
            host="127.0.0.1", port=lis.port, tls=True, ca_file=cert, ack_timeout_s=10
        )
        ack = asyncio.run(send(trusted, message))
        assert (ack.code, ack.control_id) == ("AA", "CTRL1")
        assert lis.messages() == [message]
        # the system CA store does not know the LIS's self-signed certificate: refused
        untrusted = trusted.model_copy(update={"ca_file": None})
        with pytest.raises(MllpError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            asyncio.run(send(untrusted, message))
    assert lis.messages() == [message]  # nothing was sent over the refused connection
