"""Batches reserve room in their key's files quota until they end

Revision ID: 0048
Revises: 0047
Create Date: 2026-12-07 01:30:00

A batch's output and error files are written when it ends, past any quota check then; a key could
create batches back to back from one small file until their outputs held many times its quota. Each
batch records, at its creation, the room its files are taken to need (its input's size plus an allowance for each
line's output), reserved while it has not ended. A batch created before has none recorded and
reserves its input file's size.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0048"
down_revision: str | None = "0047"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("reserved_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "reserved_bytes")
