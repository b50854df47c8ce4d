"""whole-slide analyses

Adds `slide_jobs`: one row per analysis submitted as a whole slide (`POST /v1/slides`), with
the slide's source, the progress of cutting it into tiles and, once cut, the region selection
and the thumbnail blob. Analyses of images are unchanged.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slide_jobs",
        sa.Column("analysis_id", sa.String(length=32), nullable=False),
        sa.Column("source_json", sa.Text(), nullable=False),
        sa.Column("regions_total", sa.Integer(), nullable=True),
        sa.Column("regions_done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("selection_json", sa.Text(), nullable=True),
        sa.Column("thumbnail_sha256", sa.String(length=64), nullable=True),
        sa.Column("expanded_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"]),
        sa.PrimaryKeyConstraint("analysis_id"),
    )


def downgrade() -> None:
    op.drop_table("slide_jobs")
