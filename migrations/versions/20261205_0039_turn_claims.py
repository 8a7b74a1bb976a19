"""Turns count their claims

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-05 17:00:00

A streamed turn's deltas carry their claim's rank, and a reader follows the claim of the highest
rank: a later claim's text replaces a lapsed one's. The rank was the turn's attempts, which go back
down when an attempt is refunded (an engine death, a lost database connection) or reset (a failed
scene step sent again), so the claim that took a turn over could rank as the one it replaced, and
the dead claim's late text won. `claims` counts every claim, never back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0039"
down_revision: str | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: no rewrite of the table, and no backfill under its lock: a claim counts on
    # from past the turn's attempts (db/turns.py), so one made after this revision outranks every one
    # made before it, whose rank was its attempts (a refund may have taken one back since).
    op.add_column("turns", sa.Column("claims", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("turns", "claims")
