"""An existing 0001 job store (keys, analyses, idempotency rows, audit) upgrades to 0002 on
SQLite and on the real PostgreSQL: everything lands in the `default` tenant, the idempotency
mappings survive (per tenant now), old keys keep working, and it downgrades again."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from services.gateway.db import make_engine, make_sessionmaker
from services.gateway.migrations import head_revision
from tests.gateway import test_postgres

pg_database = test_postgres.pg_database  # fixture: a fresh database, dropped afterwards


def _at_0001(engine) -> None:
    from alembic import command

    from services.gateway.migrations import alembic_config

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO api_keys (id, name, salt, key_hash, scopes, created_at) "
                "VALUES ('k1', 'lis', 'aa', 'bb', 'submit,read', 1.0), "
                "('k2', 'lis2', 'aa', 'bb', 'submit,read', 2.0)"
            )
        )
        for aid, t in (("a1", 10.0), ("a2", 20.0)):
            conn.execute(
                text(
                    "INSERT INTO analyses (id, status, accession, specimen_type, stain, "
                    "metadata_json, content_hash, api_key_id, n_images, cancel_requested, "
                    "attempts, created_at, updated_at) VALUES (:id, 'queued', 'ACC', 'bm', "
                    "'MGG', '{}', 'h', 'k1', 1, false, 0, :t, :t)"
                ),
                {"id": aid, "t": t},
            )
        # two keys used the same Idempotency-Key: the oldest mapping is kept
        conn.execute(
            text(
                "INSERT INTO idempotency (api_key_id, key, content_hash, analysis_id, created_at) "
                "VALUES ('k1', 'same', 'h', 'a1', 10.0), ('k2', 'same', 'h', 'a2', 20.0), "
                "('k1', 'other', 'h', 'a2', 21.0)"
            )
        )
        conn.execute(
            text("INSERT INTO audit_log (at, api_key_id, action) VALUES (1.0, 'k1', 'submit')")
        )


def _check_upgrade(engine) -> None:
    from alembic import command

    from services.gateway import store
    from services.gateway.migrations import alembic_config, upgrade_head

    _at_0001(engine)
    upgrade_head(engine)
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            == head_revision()
        )
        assert set(conn.execute(text("SELECT tenant FROM analyses")).scalars()) == {"default"}
        assert set(conn.execute(text("SELECT tenant FROM api_keys")).scalars()) == {"default"}
        assert conn.execute(text("SELECT tenant FROM audit_log")).scalar() == "default"
        assert conn.execute(text("SELECT requeues FROM analyses")).scalars().all() == [0, 0]
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        got = store.find_idempotent(session, tenant="default", key="same", content_hash="h")
        assert got == "a1"
        assert store.find_idempotent(session, tenant="default", key="other", content_hash="h")
        assert store.find_idempotent(session, tenant="b", key="same", content_hash="h") is None
        rows, total = store.list_analyses(session, accession=None, limit=10, offset=0, tenant="b")
        assert total == 0
        rows, total = store.list_analyses(
            session, accession=None, limit=10, offset=0, tenant="default"
        )
        assert total == 2
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM idempotency")).scalar()
    assert n == 2
    upgrade_head(engine)


def test_upgrade_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _check_upgrade(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_upgrade_postgres(pg_database):
    engine = make_engine(pg_database)
    try:
        _check_upgrade(engine)
    finally:
        engine.dispose()
