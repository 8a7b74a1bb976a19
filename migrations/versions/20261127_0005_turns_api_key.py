"""turns.api_key: the HTTP key that enqueued the turn (ingest keys read only their own turns)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 03:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('turns', sa.Column('api_key', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('turns', 'api_key')
