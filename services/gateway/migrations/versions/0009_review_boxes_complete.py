"""the review app: fields whose boxes the reviewer declared complete

Adds `case_reviews.complete_json`, a JSON list of `{image, by, at}` defaulting to `[]`, so
existing reviews read as "no field declared complete". A field marked complete has every
cell boxed (missed ones drawn, non-cells labelled ART): only such fields are exported as
detection targets, where a cell nobody boxed would otherwise teach the detector background.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("case_reviews") as batch:
        batch.add_column(sa.Column("complete_json", sa.Text(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("case_reviews") as batch:
        batch.drop_column("complete_json")
