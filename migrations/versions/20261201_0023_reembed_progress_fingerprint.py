"""A re-embed's progress records its embedder's weights (fingerprint) beside its name

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-01 11:05:00

A run resumed under the same embedder name with other weights must start its tables over, or the
next vectors would mix two models'. Progress recorded before has none, and is started over too.
"""

from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("reembed_progress", sa.Column("fingerprint", pgvector.sqlalchemy.Vector(), nullable=True))


def downgrade() -> None:
    op.drop_column("reembed_progress", "fingerprint")
