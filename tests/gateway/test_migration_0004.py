"""An existing 0003 job store upgrades to 0004 on SQLite and on the real PostgreSQL: each
analysis's `needs_npm1` / `needs_explain` are backfilled from its metadata (a single-cell
case does not call npm1, a case with `options.explain` calls explain), the claim query uses
them, and it downgrades again. At head the migrations build exactly `db.Base.metadata`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text

from services.gateway import store
from services.gateway.db import Analysis, Base, make_engine, make_sessionmaker
from services.gateway.migrations import alembic_config, head_revision, upgrade_head
from tests.gateway import test_postgres

pg_database = test_postgres.pg_database  # fixture: a fresh database, dropped afterwards
OLD = {
    "plain": {"accession_id": "A1", "options": {"explain": False}},
    "cells": {"accession_id": "A2", "input": "cells", "options": {}},
    "explained": {"accession_id": "A3", "options": {"explain": True}},
    "bare": {},
}
"""Metadata of the analyses already in the 0003 store, by id."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    """An empty job-store database on SQLite, then on the real PostgreSQL."""
    sqlite = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(
        sqlite if request.param == "sqlite" else request.getfixturevalue("pg_database")
    )
    yield engine
    engine.dispose()


def _migrate(engine, revision: str, *, down: bool = False) -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _at_0003(engine) -> None:
    _migrate(engine, "0003")
    with engine.begin() as conn:
        for t, (aid, metadata) in enumerate(OLD.items()):
            conn.execute(
                text(
                    "INSERT INTO analyses (id, status, accession, specimen_type, stain, "
                    "metadata_json, content_hash, n_images, cancel_requested, attempts, "
                    "created_at, updated_at, queued_at) VALUES (:id, 'queued', 'ACC', 'bm', "
                    "'MGG', :m, 'h', 1, false, 0, :t, :t, :t)"
                ),
                {"id": aid, "m": json.dumps(metadata, sort_keys=True), "t": float(t)},
            )
        # a row that references `analyses`: a migration that recreated the table would fail
        conn.execute(
            text(
                "INSERT INTO images (analysis_id, idx, sha256, size_bytes, width, height, "
                "format) VALUES ('cells', 0, 'ab', 1, 1, 1, 'png')"
            )
        )


def _needs(engine) -> dict[str, tuple[bool, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, needs_npm1, needs_explain FROM analyses"))
        return {aid: (bool(npm1), bool(explain)) for aid, npm1, explain in rows}


def test_upgrade_backfills_the_needs_and_downgrade_drops_them(engine):
    _at_0003(engine)
    upgrade_head(engine)
    assert head_revision() == "0009"
    assert _needs(engine) == {
        "plain": (True, False),
        "cells": (False, False),
        "explained": (True, True),
        "bare": (True, False),
    }
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        assert session.get(Analysis, "explained").needs == {
            "segmentation",
            "celltype",
            "ensemble",
            "npm1",
            "explain",
        }
    with sessions.begin() as session:
        a = store.claim_next(session, owner="w", lease_s=30, down=frozenset({"npm1"}))
        assert a is not None and a.id == "cells"

    _migrate(engine, "0003", down=True)
    columns = {c["name"] for c in inspect(engine).get_columns("analyses")}
    assert "needs_npm1" not in columns and "needs_explain" not in columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM analyses")).scalar() == len(OLD)
    upgrade_head(engine)
    assert _needs(engine)["cells"] == (False, False)


def test_the_migrations_build_the_orm_schema(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade_head(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
