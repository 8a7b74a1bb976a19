"""Structured replies: turns.structured (a JSON reply, parsed, or an NPC reply {say, emotion, action})

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 19:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('turns', sa.Column('structured', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('turns', 'structured')
