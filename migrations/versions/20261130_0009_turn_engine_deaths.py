"""Engine deaths per turn: turns.engine_deaths counts the engine deaths a turn was inside the engine
for, apart from its attempts, so a request that kills the engine is dead-lettered (engine_crash_loop)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('turns', sa.Column('engine_deaths', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('turns', 'engine_deaths')
