"""A stored file records its owner's tenant beside its key's name

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-02 18:10:00

Files (and the batches that read and write them) belonged to a key's name alone. Settings refuse
one name in two tenants at once, but not over time: a key retired from tenant A and its name given
to a key of tenant B read, downloaded and deleted A's batch inputs and outputs. The tenant is now
recorded and checked with the name. Files written before are given the tenant of the first run of
their own key that read or wrote them; one no such run names keeps none, and is its key's name's as
before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("files", sa.Column("tenant", sa.String(length=64), nullable=True))
    # The first run of the file's own key that read or wrote it: an admin's batch of another key's
    # file, or a later run of the name in another tenant, does not decide.
    op.execute(
        "UPDATE files SET tenant = first.tenant FROM ("
        " SELECT DISTINCT ON (f.id) f.id, r.tenant FROM files f JOIN runs r"
        " ON f.id IN (r.input_file_id, r.output_file_id, r.error_file_id)"
        " AND r.api_key IS NOT DISTINCT FROM f.api_key"
        " ORDER BY f.id, r.created_at, r.id"
        ") AS first WHERE files.id = first.id"
    )


def downgrade() -> None:
    op.drop_column("files", "tenant")
