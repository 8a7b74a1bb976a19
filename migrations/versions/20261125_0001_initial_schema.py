"""initial schema: the vector extension and every table


Revision ID: 0001
Revises:
Create Date: 2026-11-25 11:53:46.424006
"""
from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# The vectors' dimension is MLCHAT_EMBEDDING_DIM's when the database is created (review: 384 was
# written here, so any other embedder's dimension could never be stored, whatever the setting).
from core.settings import settings

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table('characters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('language', sa.String(length=16), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('personality', sa.Text(), nullable=False),
    sa.Column('scenario', sa.Text(), nullable=False),
    sa.Column('speech_style', sa.Text(), nullable=False),
    sa.Column('example_dialogues', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('first_message', sa.Text(), nullable=False),
    sa.Column('system_prompt', sa.Text(), nullable=False),
    sa.Column('post_history_instructions', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_characters')),
    sa.UniqueConstraint('slug', name=op.f('uq_characters_slug'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.Enum('validating', 'queued', 'in_progress', 'completed', 'failed', 'cancelling', 'cancelled', name='run_status', native_enum=False, length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs')),
    sa.UniqueConstraint('name', name=op.f('uq_runs_name'))
    )
    op.create_table('story_events',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('story', sa.String(length=100), nullable=False),
    sa.Column('ordinal', sa.Integer(), nullable=False),
    sa.Column('scene', sa.String(length=200), nullable=False),
    sa.Column('time', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('embedding', pgvector.sqlalchemy.vector.VECTOR(dim=settings.embedding_dim), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_story_events')),
    sa.UniqueConstraint('story', 'ordinal', name='uq_story_events_story_ordinal')
    )
    op.create_index('ix_story_events_embedding_hnsw', 'story_events', ['embedding'], unique=False, postgresql_using='hnsw', postgresql_with={'m': 16, 'ef_construction': 64}, postgresql_ops={'embedding': 'vector_cosine_ops'})
    op.create_table('conversations',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=False),
    sa.Column('player_id', sa.String(length=200), nullable=False),
    sa.Column('player_name', sa.String(length=200), nullable=False),
    sa.Column('character_id', sa.Integer(), nullable=False),
    sa.Column('story', sa.String(length=100), nullable=True),
    sa.Column('story_time', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['character_id'], ['characters.id'], name=op.f('fk_conversations_character_id_characters')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations')),
    sa.UniqueConstraint('external_id', name=op.f('uq_conversations_external_id'))
    )
    op.create_table('turns',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('number', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('conversation_id', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.Uuid(), nullable=True),
    sa.Column('custom_id', sa.String(length=200), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', 'cancelled', name='turn_status', native_enum=False, length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('context', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('user_message_id', sa.BigInteger(), nullable=True),
    sa.Column('reply_message_id', sa.BigInteger(), nullable=True),
    sa.Column('reply', sa.Text(), nullable=True),
    sa.Column('usage', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('timings', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_turns_attempts_non_negative')),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_turns_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_turns_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_turns')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_turns_idempotency_key')),
    sa.UniqueConstraint('number', name=op.f('uq_turns_number')),
    sa.UniqueConstraint('reply_message_id', name=op.f('uq_turns_reply_message_id'))
    )
    op.create_index(op.f('ix_turns_conversation_id'), 'turns', ['conversation_id'], unique=False)
    op.create_index('ix_turns_run_status', 'turns', ['run_id', 'status'], unique=False)
    op.create_table('messages',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('conversation_id', sa.BigInteger(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('role', sa.Enum('user', 'assistant', 'narrator', 'system', name='message_role', native_enum=False, length=16), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('embedding', pgvector.sqlalchemy.vector.VECTOR(dim=settings.embedding_dim), nullable=True),
    sa.Column('turn_id', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_messages_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['turn_id'], ['turns.id'], name=op.f('fk_messages_turn_id_turns'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('conversation_id', 'seq', name='uq_messages_conversation_seq')
    )
    op.create_index('uq_messages_turn_role', 'messages', ['turn_id', 'role'], unique=True, postgresql_where='turn_id IS NOT NULL')
    # turns <-> messages reference each other: the turn-side keys are added once both tables exist.
    op.create_foreign_key(op.f('fk_turns_user_message_id_messages'), 'turns', 'messages', ['user_message_id'], ['id'], ondelete='SET NULL')
    op.create_foreign_key(op.f('fk_turns_reply_message_id_messages'), 'turns', 'messages', ['reply_message_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    op.drop_constraint(op.f('fk_turns_reply_message_id_messages'), 'turns', type_='foreignkey')
    op.drop_constraint(op.f('fk_turns_user_message_id_messages'), 'turns', type_='foreignkey')
    op.drop_index('uq_messages_turn_role', table_name='messages', postgresql_where='turn_id IS NOT NULL')
    op.drop_table('messages')
    op.drop_index('ix_turns_run_status', table_name='turns')
    op.drop_index(op.f('ix_turns_conversation_id'), table_name='turns')
    op.drop_table('turns')
    op.drop_table('conversations')
    op.drop_index('ix_story_events_embedding_hnsw', table_name='story_events', postgresql_using='hnsw', postgresql_with={'m': 16, 'ef_construction': 64}, postgresql_ops={'embedding': 'vector_cosine_ops'})
    op.drop_table('story_events')
    op.drop_table('runs')
    op.drop_table('characters')
    op.execute("DROP EXTENSION IF EXISTS vector")
