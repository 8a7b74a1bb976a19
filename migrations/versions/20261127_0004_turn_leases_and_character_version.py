"""turn leases, dispatch times and error codes; character version

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 00:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('characters', sa.Column('version', sa.Integer(), server_default='1', nullable=False))
    op.add_column('turns', sa.Column('error_code', sa.String(length=32), nullable=True))
    op.add_column('turns', sa.Column('claim_token', sa.Uuid(), nullable=True))
    op.add_column('turns', sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('turns', sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    # Turns queued before leases existed were sent when they were created.
    op.execute("UPDATE turns SET dispatched_at = created_at WHERE status IN ('queued', 'running')")
    op.execute(
        "UPDATE turns SET error_code = 'broker_unreachable' "
        "WHERE status = 'failed' AND error LIKE 'broker unreachable at enqueue%'"
    )
    op.create_index(
        'ix_turns_unfinished', 'turns', ['number'], unique=False,
        postgresql_where="status IN ('queued', 'running')",
    )


def downgrade() -> None:
    op.drop_index('ix_turns_unfinished', table_name='turns', postgresql_where="status IN ('queued', 'running')")
    op.drop_column('turns', 'dispatched_at')
    op.drop_column('turns', 'lease_until')
    op.drop_column('turns', 'claim_token')
    op.drop_column('turns', 'error_code')
    op.drop_column('characters', 'version')
