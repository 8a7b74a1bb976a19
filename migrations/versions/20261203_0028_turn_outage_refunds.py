"""A turn counts the attempts refunded for a lost database connection

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-03 11:20:00

A batch stopped by a lost database connection hands its turns back with the attempt refunded
(nobody's fault). A statement that crashes its PostgreSQL backend every time also looks like a lost
connection, so such a turn was refunded for ever and took the database down again at every round.
Past MLCHAT_MAX_OUTAGE_REFUNDS refunds the attempt is charged, and the turn fails at its cap.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("outage_refunds", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("turns", "outage_refunds")
