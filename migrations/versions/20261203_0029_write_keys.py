"""Idempotency keys for facts and story events

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-03 23:45:00

A game that retried `POST /v1/players/{player}/facts` or `POST /v1/stories/{story}/events` after a
lost answer stored the facts or the event twice (and a retried supersede was refused as "superseded
meanwhile"). With an `Idempotency-Key`, the first write's ids are kept here and a retry returns them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "write_keys",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("ids", JSONB(), nullable=False, server_default="[]"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("tenant", "kind", "key"),
    )


def downgrade() -> None:
    op.drop_table("write_keys")
