"""which optional model services an analysis calls

Adds `needs_npm1` and `needs_explain` to analyses, so a worker can claim, while npm1 or
explain is down, the analyses that do not call it (the input kind and the options live only
in `metadata_json`, which the claim query cannot read). Existing rows are backfilled from
their metadata as `db.optional_needs` sets new ones: a single-cell case (`"input": "cells"`)
does not call npm1; a case with `options.explain` calls explain.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 10:00:00
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE ... ADD COLUMN: SQLite's batch mode would recreate `analyses` for an
    # expression default, and DROP a table other tables reference (its foreign keys refuse)
    op.add_column(
        "analyses", sa.Column("needs_npm1", sa.Boolean(), nullable=False, server_default=sa.true())
    )
    op.add_column(
        "analyses",
        sa.Column("needs_explain", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    analyses = sa.table(
        "analyses",
        sa.column("id", sa.String),
        sa.column("needs_npm1", sa.Boolean),
        sa.column("needs_explain", sa.Boolean),
    )
    conn = op.get_bind()
    # only a cells case or one naming explain can differ from the defaults: read just those
    rows = conn.execute(
        sa.text(
            "SELECT id, metadata_json FROM analyses "
            "WHERE metadata_json LIKE '%cells%' OR metadata_json LIKE '%explain%'"
        )
    ).all()
    for analysis_id, metadata_json in rows:
        metadata = json.loads(metadata_json)
        cells = metadata.get("input") == "cells"
        explain = bool(metadata.get("options", {}).get("explain"))
        if cells or explain:
            conn.execute(
                analyses.update()
                .where(analyses.c.id == analysis_id)
                .values(needs_npm1=not cells, needs_explain=explain)
            )


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN for the same reason (SQLite >= 3.35 has it, as in 0002)
    op.drop_column("analyses", "needs_explain")
    op.drop_column("analyses", "needs_npm1")
