"""OpenAI batches: run format, options, metadata, window, file ids, callback; the files table;
turns.alternatives (best of n); LoRA adapters on characters, and on turns the one that answered

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 07:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STAMPS = ('expires_at', 'in_progress_at', 'finalizing_at', 'cancelling_at', 'callback_delivered_at')
_STRINGS = {
    'completion_window': 16,
    'cancel_reason': 16,
    'input_file_id': 64,
    'output_file_id': 64,
    'error_file_id': 64,
    'api_key': 64,
}


def upgrade() -> None:
    op.add_column('runs', sa.Column('input_format', sa.String(16), server_default='native', nullable=False))
    op.add_column(
        'runs', sa.Column('options', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False)
    )
    op.add_column('runs', sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('runs', sa.Column('line_errors', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    for name, length in _STRINGS.items():
        op.add_column('runs', sa.Column(name, sa.String(length), nullable=True))
    for name in _STAMPS:
        op.add_column('runs', sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.add_column('runs', sa.Column('callback_url', sa.Text(), nullable=True))
    op.add_column('runs', sa.Column('callback_attempts', sa.Integer(), server_default='0', nullable=False))
    op.add_column('runs', sa.Column('callback_error', sa.Text(), nullable=True))
    op.add_column('turns', sa.Column('alternatives', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('turns', sa.Column('adapter', sa.String(100), nullable=True))
    op.add_column('characters', sa.Column('lora_path', sa.Text(), nullable=True))
    op.add_column('characters', sa.Column('lora_version', sa.Integer(), server_default='0', nullable=False))
    op.create_table(
        'files',
        sa.Column('id', sa.String(64), nullable=False),
        sa.Column('purpose', sa.String(32), nullable=False),
        sa.Column('filename', sa.String(255), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('api_key', sa.String(64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_files')),
    )


def downgrade() -> None:
    op.drop_table('files')
    op.drop_column('turns', 'alternatives')
    op.drop_column('turns', 'adapter')
    op.drop_column('characters', 'lora_path')
    op.drop_column('characters', 'lora_version')
    for name in ('callback_error', 'callback_attempts', 'callback_url', *_STAMPS, *_STRINGS):
        op.drop_column('runs', name)
    for name in ('line_errors', 'metadata', 'options', 'input_format'):
        op.drop_column('runs', name)
