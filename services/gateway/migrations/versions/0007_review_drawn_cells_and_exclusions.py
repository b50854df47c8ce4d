"""the review app: cells the reviewer drew, images and regions the reviewer excluded

Adds `case_reviews.added_json` (cells the detector missed, drawn as boxes) and
`case_reviews.excluded_json` (whole images or regions left out of the reviewed count), both
JSON lists defaulting to `[]`, so existing reviews read as "nothing drawn, nothing excluded".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("case_reviews") as batch:
        batch.add_column(sa.Column("added_json", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("excluded_json", sa.Text(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("case_reviews") as batch:
        batch.drop_column("excluded_json")
        batch.drop_column("added_json")
