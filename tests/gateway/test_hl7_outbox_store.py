"""The HL7 outbox's claim keeps each analysis's messages in order, on SQLite and on the real
PostgreSQL: a later message waits while an earlier one is pending, not once it is parked;
a leased row is not claimed twice; the finish transaction enqueues only configured tenants."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.gateway import hl7outbox, store
from services.gateway.db import Analysis, Hl7Outbox, make_engine, make_sessionmaker
from services.gateway.migrations import upgrade_head
from tests.gateway import test_postgres

pg_database = test_postgres.pg_database  # fixture: a fresh database, dropped afterwards


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sessions(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'store.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_database")
    )
    engine = make_engine(url)
    upgrade_head(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _analysis(session, aid: str, tenant: str = "default", status: str = "queued") -> None:
    session.add(
        Analysis(
            id=aid,
            status=status,
            accession=f"ACC-{aid}",
            specimen_type="bone_marrow_aspirate",
            stain="MGG",
            metadata_json="{}",
            content_hash=aid,
            tenant=tenant,
            n_images=1,
        )
    )


def _claim(sessions) -> list[tuple[str, int]]:
    with sessions.begin() as session:
        return [(r.analysis_id, r.seq) for r in hl7outbox.claim(session, lease_s=60)]


def _record(sessions, analysis_id: str, seq: int, outcome: str) -> None:
    with sessions.begin() as session:
        row = session.scalars(
            select(Hl7Outbox).where(Hl7Outbox.analysis_id == analysis_id, Hl7Outbox.seq == seq)
        ).one()
        hl7outbox.record(
            session,
            outbox_id=row.id,
            outcome=outcome,
            control_id=row.id[:20],
            message="MSH|...",
            ack=None,
            error=None,
        )


def test_claim_keeps_each_analysis_in_order(sessions):
    with sessions.begin() as session:
        for aid in ("a", "b"):
            _analysis(session, aid)
    with sessions.begin() as session:
        hl7outbox.enqueue(session, analysis_id="a", tenant="default", event="finished")
        hl7outbox.enqueue(session, analysis_id="b", tenant="default", event="finished")
    with sessions.begin() as session:
        hl7outbox.enqueue(session, analysis_id="a", tenant="default", event="signed_out")

    assert sorted(_claim(sessions)) == [("a", 1), ("b", 1)]  # a's second waits for its first
    assert _claim(sessions) == []  # leased: nobody else takes them
    _record(sessions, "a", 1, "delivered")
    _record(sessions, "b", 1, "retry")
    assert sorted(_claim(sessions)) == [("a", 2), ("b", 1)]
    _record(sessions, "a", 2, "parked")
    with sessions.begin() as session:
        hl7outbox.enqueue(session, analysis_id="a", tenant="default", event="amended")
    assert _claim(sessions) == [("a", 3)]  # a parked message holds nothing back


def test_finish_enqueues_only_tenants_with_a_destination(sessions):
    with sessions.begin() as session:
        _analysis(session, "x", tenant="site-a", status="running")
        _analysis(session, "y", tenant="site-b", status="running")
    for aid in ("x", "y"):
        with sessions.begin() as session:
            assert store.finish(
                session,
                analysis_id=aid,
                owner=None,
                status="succeeded",
                result={"analysis_id": aid},
                hl7_tenants={"site-a"},
            )
    assert _claim(sessions) == [("x", 1)]


def test_an_analysis_without_a_result_still_reaches_the_lis(sessions):
    """Failed in the worker, cancelled while queued, failed by housekeeping: each gets an
    ORU row (event failed / cancelled) for a tenant with a destination, none for others."""
    with sessions.begin() as session:
        _analysis(session, "f", tenant="site-a", status="running")
        _analysis(session, "q", tenant="site-a")
        _analysis(session, "o", tenant="site-b", status="running")
    with sessions.begin() as session:
        for aid in ("f", "o"):
            assert store.finish(
                session,
                analysis_id=aid,
                owner=None,
                status="failed",
                reason="segmentation service error",
                hl7_tenants={"site-a"},
            )
        assert store.request_cancel(session, analysis_id="q", hl7_tenants={"site-a"})
    with sessions.begin() as session:
        rows = session.scalars(select(Hl7Outbox).order_by(Hl7Outbox.analysis_id)).all()
        assert [(r.analysis_id, r.event) for r in rows] == [("f", "failed"), ("q", "cancelled")]
        # what the dispatcher sends for them: OBR-25 X, the reason, no result needed
        from services.gateway.hl7delivery import render
        from services.gateway.mllp import Hl7Destination

        lis = Hl7Destination(host="127.0.0.1", port=2575)
        failed, cancelled = (render(session, None, r, lis, "") for r in rows)
        assert "|X" in failed.split("\rOBR|")[1].split("\r")[0]
        assert "segmentation service error" in failed
        assert "cancelled by request" in cancelled
