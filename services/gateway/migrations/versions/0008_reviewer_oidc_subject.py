"""reviewers who log in through OIDC: the identity provider's subject

Adds `reviewers.oidc_subject` (unique, null for local accounts): `<issuer> <sub>`, the one
stable identifier an OpenID provider gives a person, so a renamed user or a changed email
keeps their reviewer record, and no OIDC login can take over a local account by name.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviewers") as batch:
        batch.add_column(sa.Column("oidc_subject", sa.String(512), nullable=True))
        batch.create_unique_constraint("uq_reviewers_oidc_subject", ["oidc_subject"])


def downgrade() -> None:
    with op.batch_alter_table("reviewers") as batch:
        batch.drop_constraint("uq_reviewers_oidc_subject", type_="unique")
        batch.drop_column("oidc_subject")
