"""HL7 v2 result outbox

Adds `hl7_outbox`: the ORU^R01 messages to deliver over MLLP, one row per analysis and event,
written with the result (`services.gateway.hl7outbox`). Nothing else changes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 14:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hl7_outbox",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("analysis_id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_answers", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("control_id", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("ack", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("analysis_id", "event", name="uq_hl7_outbox_event"),
    )
    op.create_index("ix_hl7_outbox_analysis_id", "hl7_outbox", ["analysis_id"])
    op.create_index("ix_hl7_outbox_status", "hl7_outbox", ["status"])


def downgrade() -> None:
    op.drop_index("ix_hl7_outbox_status", table_name="hl7_outbox")
    op.drop_index("ix_hl7_outbox_analysis_id", table_name="hl7_outbox")
    op.drop_table("hl7_outbox")
