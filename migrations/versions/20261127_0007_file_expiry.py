"""File expiry: files.expires_at (OpenAI's expires_after on uploads), runs.output_expires_after_s
(output_expires_after on batches: the output and error files expire that long after they are written)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('files', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        'ix_files_expires_at', 'files', ['expires_at'], postgresql_where=sa.text('expires_at IS NOT NULL')
    )
    op.add_column('runs', sa.Column('output_expires_after_s', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('runs', 'output_expires_after_s')
    op.drop_index('ix_files_expires_at', table_name='files')
    op.drop_column('files', 'expires_at')
