"""Alembic migrations of the job store, configured in code (no alembic.ini).

`upgrade_head(url)` runs at gateway and worker start-up; on PostgreSQL it holds an advisory
lock so several processes starting together migrate once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)
_LOCK_ID = 7_400_213_911  # arbitrary, constant: the gateway's migration advisory lock


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade_head(engine: Engine) -> None:
    """Bring the database behind `engine` to the newest schema revision."""
    from alembic import command

    cfg = alembic_config(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_ID})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_ID})
                conn.commit()
    else:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    log.info("job store schema at head")


def head_revision() -> str:
    """The newest revision in `versions/` (what `upgrade_head` brings a database to)."""
    from alembic.script import ScriptDirectory

    from services.gateway.db import make_engine

    script = ScriptDirectory.from_config(alembic_config(make_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head
