"""tenants, requeue after outages, per-tenant idempotency keys

Adds `tenant` to keys, analyses and the audit (existing rows: `default`, which keeps a
single-site deployment working as before), the requeue columns of analyses (`queued_at`,
`not_before`, `requeues`) and replaces `idempotency` (unique per API key) by
`idempotency_keys` (unique per tenant). Rows of the old table move over; where two keys had
used the same Idempotency-Key, the oldest mapping is kept (the newer analysis stays readable
by id, only its key replay is lost).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 18:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT = "default"


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.String(length=64), nullable=False, server_default=DEFAULT)
        )
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.String(length=64), nullable=False, server_default=DEFAULT)
        )
        batch_op.add_column(sa.Column("queued_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("not_before", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("requeues", sa.Integer(), nullable=False, server_default="0"))
        batch_op.create_index(batch_op.f("ix_analyses_tenant"), ["tenant"], unique=False)
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_audit_log_tenant"), ["tenant"], unique=False)
    op.execute(sa.text("UPDATE audit_log SET tenant = :t").bindparams(t=DEFAULT))

    new = op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("analysis_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"]),
        sa.PrimaryKeyConstraint("tenant", "key"),
    )
    conn = op.get_bind()
    old = conn.execute(
        sa.text(
            "SELECT api_key_id, key, content_hash, analysis_id, created_at FROM idempotency "
            "ORDER BY created_at"
        )
    ).all()
    seen: set[str] = set()
    rows = []
    for api_key_id, key, content_hash, analysis_id, created_at in old:
        if key in seen:  # every old key belonged to the default tenant; keep the oldest
            continue
        seen.add(key)
        rows.append(
            {
                "tenant": DEFAULT,
                "key": key,
                "api_key_id": api_key_id,
                "content_hash": content_hash,
                "analysis_id": analysis_id,
                "created_at": created_at,
            }
        )
    if rows:
        op.bulk_insert(new, rows)
    op.drop_table("idempotency")


def downgrade() -> None:
    old = op.create_table(
        "idempotency",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("analysis_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"]),
        sa.PrimaryKeyConstraint("api_key_id", "key"),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            "SELECT api_key_id, key, content_hash, analysis_id, created_at FROM idempotency_keys"
        )
    ).all()
    if rows:
        op.bulk_insert(
            old,
            [
                {
                    "api_key_id": r[0],
                    "key": r[1],
                    "content_hash": r[2],
                    "analysis_id": r[3],
                    "created_at": r[4],
                }
                for r in rows
            ],
        )
    op.drop_table("idempotency_keys")
    # plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): a batch recreate of
    # `analyses` would DROP a table other tables reference, which SQLite's foreign keys refuse
    op.drop_index("ix_audit_log_tenant", table_name="audit_log")
    op.drop_column("audit_log", "tenant")
    op.drop_index("ix_analyses_tenant", table_name="analyses")
    for column in ("requeues", "not_before", "queued_at", "tenant"):
        op.drop_column("analyses", column)
    op.drop_column("api_keys", "tenant")
