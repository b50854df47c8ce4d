"""Orders in over real MLLP sockets: an order creates its analysis and its ORU^R01 comes back
to the tenant's real MLLP receiver; a resent order finds its analysis; every refusal is an
AE / AR with an ERR naming the problem, and creates nothing."""

from __future__ import annotations

from sqlalchemy import func, select

from services.gateway.db import Analysis, AuditLog, Idempotency
from tests.gateway.conftest import wait_status
from tests.gateway.mllp_server import MllpServer
from tests.hl7.conftest import Client, err, inputs, msa, order
from tests.polling import wait_for


def _analyses(services) -> list[Analysis]:
    with services.sessions() as session:
        rows = list(session.scalars(select(Analysis).order_by(Analysis.created_at)))
        session.expunge_all()
        return rows


def _analysis_id(ack: str) -> str:
    fields = msa(ack)
    assert fields[1] == "AA", ack
    return fields[3].split()[1]


def test_order_creates_the_analysis_and_its_oru_comes_back(gateway, listen, tmp_path):
    root = tmp_path / "inputs"
    inputs(root, "ACC-1", n=2)
    with MllpServer() as lis:
        client, services, keys = gateway(
            hl7_destinations={
                "default": {"host": "127.0.0.1", "port": lis.port, "ack_timeout_s": 5}
            }
        )
        with client:
            listener = listen(services.settings, input_root=root)
            mllp = Client(listener.port)
            ack = mllp.send(order("PO-1^LIS", "ACC-1", control="C-1"))
            assert msa(ack)[2] == "C-1" and "|ACK^O33^ACK|" in ack
            aid = _analysis_id(ack)
            done = wait_status(client.get, aid, keys["admin"])
            assert done["status"] == "succeeded" and done["accession_id"] == "ACC-1"
            assert len(done["images"]) == 2
            (oru,) = wait_for(lis.messages, "the ORU^R01")
            mllp.close()
    segs = {s[:3]: s.split("|") for s in oru.split("\r")}
    assert segs["PID"][3] == "12345^^^HOSP^MR" and segs["PID"][5] == "DOE^JANE"
    assert segs["ORC"][2] == "PO-1^LIS" and segs["ORC"][3] == f"{aid}^MARROWSCOPE"
    assert segs["OBR"][4].startswith("marrowscope-analysis^")
    with services.sessions() as session:
        audit = list(session.scalars(select(AuditLog).where(AuditLog.resource == aid)))
    actions = [a.action for a in audit]
    assert {"hl7_order", "hl7_in", "hl7_ack", "hl7_send"} <= set(actions)
    assert any(a.action == "hl7_ack" and a.detail.startswith("AA msh10=C-1") for a in audit)


def test_a_resent_order_finds_its_analysis(gateway, listen, tmp_path):
    root = tmp_path / "inputs"
    inputs(root, "ACC-2")
    client, services, _keys = gateway(embedded_worker=False)
    listener = listen(services.settings, input_root=root)
    mllp = Client(listener.port)
    first = _analysis_id(mllp.send(order("PO-2", "ACC-2", control="C-1")))
    # the same order again (an un-ACKed resend), and again with a new MSH-10 on a new connection
    assert _analysis_id(mllp.send(order("PO-2", "ACC-2", control="C-1"))) == first
    other = Client(listener.port)
    again = other.send(order("PO-2", "ACC-2", control="C-2"))
    assert _analysis_id(again) == first and "order known" in msa(again)[3]
    # the same placer number for another patient: refused, nothing created
    conflict = other.send(order("PO-2", "ACC-2", control="C-3", pid3="999^^^HOSP^MR"))
    assert msa(conflict)[1] == "AE" and err(conflict)[3].startswith("205^")
    # an ORM^O01 of single cells (accession in OBR-18) is its own analysis
    inputs(root, "ACC-3", n=3, seed=5)
    cells = other.send(
        order("PO-3", "ACC-3", control="C-4", kind="ORM", service="marrowscope-cells")
    )
    assert "|ACK^O01^ACK|" in cells
    cells_id = _analysis_id(cells)
    mllp.close()
    other.close()
    rows = _analyses(services)
    assert [a.id for a in rows] == [first, cells_id]
    assert rows[1].n_images == 3 and '"input": "cells"' in rows[1].metadata_json
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Idempotency)) == 2


REFUSALS = {
    # name: (message, ACK code, ERR-3 code, a word of the explanation)
    "not HL7": ("hello world", "AR", "100", "MSH"),
    "other delimiters": (order().replace("|^~\\&|", "|^~\\#|", 1), "AR", "102", "delimiters"),
    "no control id": (order(control=""), "AR", "101", "MSH-10"),
    "version 2.3": (order(version="2.3"), "AR", "203", "2.5.1"),
    "ADT": (order().replace("OML^O33^OML_O33", "ADT^A01^ADT_A01"), "AR", "200", "ADT"),
    "OML^O21": (order().replace("OML^O33^OML_O33", "OML^O21^OML_O21"), "AR", "201", "O21"),
    "unknown facility": (order(facility="ELSEWHERE"), "AR", "103", "ELSEWHERE"),
    "no patient id": (order(pid3=""), "AE", "101", "PID"),
    "bad date": (order().replace("19700101", "1970-01-01"), "AE", "102", "date"),
    "cancel": (order(control_code="CA"), "AE", "103", "NW"),
    "unknown service": (order(service="cbc"), "AE", "103", "cbc"),
    "no placer number": (order(placer=""), "AE", "101", "placer"),
    "unknown accession": (order(accession="ACC-404"), "AE", "204", "ACC-404"),
    "path in accession": (order(accession="..\\S\\etc"), "AE", "102", "accession"),
    "bad pixel size": (
        order(extra=("OBX|1|NM|um-per-px^Pixel size^99MSC||50||||||F",)),
        "AE",
        "102",
        "um_per_px",
    ),
    "not an image": (order(accession="ACC-BAD"), "AE", "207", "image"),
}


def test_every_refusal_names_the_problem_and_creates_nothing(gateway, listen, tmp_path):
    root = tmp_path / "inputs"
    (root / "ACC-BAD").mkdir(parents=True)
    (root / "ACC-BAD" / "x.png").write_bytes(b"not a png")
    _client, services, _keys = gateway(embedded_worker=False)
    listener = listen(
        services.settings, input_root=root, tenant="", facility_tenants={"HEMLAB": "default"}
    )
    mllp = Client(listener.port)
    for name, (message, code, hl7_code, word) in REFUSALS.items():
        ack = mllp.send(message)
        assert msa(ack)[1] == code, (name, ack)
        error = err(ack)
        assert error[3].split("^")[0] == hl7_code, (name, ack)
        assert word.lower() in (error[8] + msa(ack)[3]).lower(), (name, ack)
    mllp.close()
    assert _analyses(services) == []
    with services.sessions() as session:
        acks = list(session.scalars(select(AuditLog).where(AuditLog.action == "hl7_ack")))
    assert len(acks) == len(REFUSALS)
