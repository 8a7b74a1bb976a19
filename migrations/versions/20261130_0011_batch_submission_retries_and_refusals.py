"""Batch submission retries and per-request refusals: runs.error_code (a failed run's cause, the
file's or the server's), runs.submission_attempts and runs.submission_retry_at (a transient error
keeps a batch validating and tries it again later), runs.refused (well-formed requests refused by
policy, answered in the error file)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('runs', sa.Column('error_code', sa.String(length=32), nullable=True))
    op.add_column(
        'runs', sa.Column('submission_attempts', sa.Integer(), server_default='0', nullable=False)
    )
    op.add_column('runs', sa.Column('submission_retry_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('runs', sa.Column('refused', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    # Before this revision a failed run was either a bad file (line_errors) or a stopped submission.
    op.execute(
        "UPDATE runs SET error_code = CASE WHEN line_errors IS NULL THEN 'server_error' "
        "ELSE 'invalid_request' END WHERE status = 'failed'"
    )


def downgrade() -> None:
    op.drop_column('runs', 'refused')
    op.drop_column('runs', 'submission_retry_at')
    op.drop_column('runs', 'submission_attempts')
    op.drop_column('runs', 'error_code')
