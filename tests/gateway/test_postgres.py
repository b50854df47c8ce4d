"""The job store on the real PostgreSQL: two worker processes share the queue (SKIP LOCKED),
one is killed with SIGKILL mid-analysis and the other takes its analysis over."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from services.gateway.migrations import head_revision
from tests.gateway.conftest import create_key_cli, files, meta, png, settings_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def pg_database(postgres_url):
    """A uniquely named database for this test, dropped afterwards."""
    name = f"ms_gateway_{uuid.uuid4().hex[:10]}"
    admin_url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def test_two_workers_kill_one(tmp_path, pg_database, spawn, port_factory):
    # pg_database first: torn down last, after `spawn` stopped the processes that hold it
    base = settings_env(
        tmp_path / "gw", MS_GATEWAY_DATABASE_URL=pg_database, MS_TEST_FAKE_SEG_DELAY_S="1.5"
    )
    key = create_key_cli(base)
    api = spawn(
        {**base, "MS_GATEWAY_EMBEDDED_WORKER": "false"}, port_factory(), log=tmp_path / "api.log"
    )
    w1 = spawn(base, module="services.gateway.worker", log=tmp_path / "w1.log")
    w2 = spawn(base, module="services.gateway.worker", log=tmp_path / "w2.log")
    api.wait_healthy()
    eng = create_engine(pg_database)
    with httpx.Client(base_url=api.url, timeout=10, headers={"X-API-Key": key}) as c:
        ids = [
            c.post("/v1/analyses", files=files(png(seed=s), metadata=meta())).json()["id"]
            for s in range(4)
        ]
        # wait until both workers hold one analysis each, then kill the first one's owner
        end = time.monotonic() + 30
        owners: list[str] = []
        while time.monotonic() < end:
            with eng.connect() as conn:
                owners = (
                    conn.execute(
                        text("SELECT DISTINCT lease_owner FROM analyses WHERE status = 'running'")
                    )
                    .scalars()
                    .all()
                )
            if len(owners) == 2:
                break
            time.sleep(0.05)
        assert len(owners) == 2, "the two workers did not run analyses concurrently"
        victim = w1 if any(f":{w1.proc.pid}:" in o for o in owners) else w2
        victim.kill()
        end = time.monotonic() + 60
        bodies = []
        while time.monotonic() < end:
            bodies = [c.get(f"/v1/analyses/{i}").json() for i in ids]
            if all(b["status"] not in ("queued", "running") for b in bodies):
                break
            time.sleep(0.2)
    assert [b["status"] for b in bodies] == ["succeeded"] * 4, bodies
    with eng.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM analyses")).scalars().all()
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    eng.dispose()
    assert max(attempts) == 2 and min(attempts) == 1  # exactly the killed one was retaken
    assert version == head_revision() == "0009"
