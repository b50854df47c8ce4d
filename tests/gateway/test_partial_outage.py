"""While only npm1 or explain is down, the analyses that do not call it still run: the job
store claims (and fails past the requeue window) only by what each analysis needs
(`Analysis.needs`), on SQLite and on the real PostgreSQL; an in-process gateway runs a
single-cell case while npm1 is down and holds the field case without burning attempts."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from services.gateway import store
from services.gateway.db import Analysis, make_sessionmaker
from services.gateway.migrations import upgrade_head
from tests.gateway import test_migration_0004
from tests.gateway.conftest import files, meta, png, wait_status

engine = test_migration_0004.engine  # fixture: an empty database, SQLite then PostgreSQL
pg_database = test_migration_0004.pg_database  # the PostgreSQL database `engine` asks for
NPM1_DOWN = frozenset({"npm1"})
EXPLAIN_DOWN = frozenset({"explain"})


@pytest.fixture
def sessions(engine):
    """A migrated job store on SQLite, then on PostgreSQL."""
    upgrade_head(engine)
    return make_sessionmaker(engine)


def _submit(sessions, created_at: float, **doc) -> str:
    """A queued analysis with metadata `doc`, submitted at `created_at` (claim order)."""
    metadata = {"accession_id": "ACC", "specimen_type": "bone_marrow_aspirate", "stain": "MGG"}
    with sessions.begin() as session:
        a = store.create_analysis(
            session,
            metadata={**metadata, **doc},
            images=[],
            content_hash="h",
            key_id=None,
            idempotency_key=None,
        )
        a.created_at = a.queued_at = created_at
        return a.id


def _claim(sessions, down: frozenset[str]) -> str | None:
    with sessions.begin() as session:
        a = store.claim_next(session, owner="w1", lease_s=30, down=down)
        return None if a is None else a.id


def _row(sessions, analysis_id: str) -> tuple[str, int]:
    with sessions() as session:
        a = session.get(Analysis, analysis_id)
        assert a is not None
        return a.status, a.attempts


def test_npm1_down_claims_a_cells_case_and_leaves_an_older_fields_case(sessions):
    fields = _submit(sessions, 1.0)
    cells = _submit(sessions, 2.0, input="cells")
    assert _claim(sessions, NPM1_DOWN) == cells
    assert _claim(sessions, NPM1_DOWN) is None
    assert _row(sessions, fields) == ("queued", 0)
    assert _claim(sessions, frozenset({"npm1", "segmentation"})) is None
    assert _claim(sessions, frozenset()) == fields


def test_explain_down_claims_only_the_cases_that_did_not_ask_for_explanations(sessions):
    explained = _submit(sessions, 1.0, options={"explain": True})
    plain = _submit(sessions, 2.0, options={"explain": False})
    assert _claim(sessions, EXPLAIN_DOWN) == plain
    assert _claim(sessions, EXPLAIN_DOWN) is None
    assert _row(sessions, explained) == ("queued", 0)
    assert _claim(sessions, frozenset()) == explained


def test_a_lease_expired_fields_case_is_not_taken_over_while_npm1_is_down(sessions):
    fields = _submit(sessions, 1.0)
    with sessions.begin() as session:
        a = store.claim_next(session, owner="w0", lease_s=-1)  # its lease is already over
        assert a is not None and a.id == fields
    assert _claim(sessions, NPM1_DOWN) is None
    assert _claim(sessions, frozenset()) == fields


def _fail_waited(sessions, down: frozenset[str]) -> dict[str, str]:
    with sessions.begin() as session:
        return dict(store.fail_waited_too_long(session, window_s=10, down=down))


def test_past_the_window_only_the_cases_that_need_the_down_service_fail(sessions):
    fields = _submit(sessions, 1.0)
    explained = _submit(sessions, 2.0, options={"explain": True})
    cells = _submit(sessions, 3.0, input="cells")
    failed = _fail_waited(sessions, EXPLAIN_DOWN)
    assert list(failed) == [explained]
    assert failed[explained].startswith("model service(s) explain not ready for longer than")
    failed = _fail_waited(sessions, frozenset({"npm1", "explain"}))
    assert list(failed) == [fields]
    assert failed[fields].startswith("model service(s) npm1 not ready for longer than")
    assert _row(sessions, cells) == ("queued", 0)
    assert list(_fail_waited(sessions, frozenset({"celltype"}))) == [cells]


def test_npm1_down_a_cells_case_runs_while_the_fields_case_waits(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_DOWN", "npm1")
    client, services, keys = gateway(
        ready_check_s="0.2", requeue_window_s="600", rate_limit_per_min="100000"
    )
    h = keys["lis"]
    crops = [png(40, 44, seed=500 + k) for k in range(30)]
    with client:
        fields = client.post("/v1/analyses", files=files(png(seed=1), metadata=meta()), headers=h)
        cells = client.post(
            "/v1/analyses", files=files(*crops, metadata=meta(input="cells")), headers=h
        )
        body = wait_status(client.get, cells.json()["id"], h, timeout=30)
        assert body["status"] == "succeeded", body["reason"]
        time.sleep(0.5)  # a few more claim rounds: the fields case is still not taken
        waiting = client.get(f"/v1/analyses/{fields.json()['id']}", headers=h).json()
        assert waiting["status"] == "queued" and waiting["reason"] is None, waiting
        with services.sessions() as session:
            attempts = session.scalar(
                select(Analysis.attempts).where(Analysis.id == fields.json()["id"])
            )
        assert attempts == 0
        assert "npm1" not in services.clients.calls
        services.clients.down = frozenset()  # npm1 is back: the fields case runs
        body = wait_status(client.get, fields.json()["id"], h, timeout=30)
    assert body["status"] == "succeeded", body["reason"]
    assert services.clients.calls["npm1"] >= 1
