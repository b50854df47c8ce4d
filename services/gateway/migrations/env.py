"""Alembic environment: always online, on the connection handed over by `upgrade_head`."""

from __future__ import annotations

from alembic import context

from services.gateway.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through services.gateway.migrations.upgrade_head()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
