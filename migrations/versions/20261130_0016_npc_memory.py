"""NPC memory: facts (scoped, superseded, gossip moves recorded), rolling summaries, memory jobs;
the next embedder's vectors beside each embedding and the re-embed's progress (mlchat reembed)

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30 18:00:00
"""

from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op

# The vectors' dimension is MLCHAT_EMBEDDING_DIM's when the database is created (review: 384 was
# written here, so any other embedder's dimension could never be stored, whatever the setting).
from core.settings import settings

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "facts",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("tenant", sa.String(64), server_default="", nullable=False),
        sa.Column("player_id", sa.String(200), server_default="", nullable=False),
        sa.Column(
            "kind",
            sa.Enum("player", "world", "npc", name="fact_kind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("importance", sa.Float(), nullable=False),
        sa.Column(
            "scope",
            sa.Enum("conversation", "met", "story", "world", name="fact_scope", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("scope_ref", sa.String(200), server_default="", nullable=False),
        sa.Column("embedding", pgvector.sqlalchemy.vector.VECTOR(dim=settings.embedding_dim), nullable=True),
        sa.Column("superseded_by", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("importance BETWEEN 0 AND 1", name=op.f("ck_facts_importance_bounded")),
        sa.ForeignKeyConstraint(
            ["superseded_by"], ["facts.id"], name=op.f("fk_facts_superseded_by_facts"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_facts")),
    )
    op.create_index("ix_facts_tenant_player", "facts", ["tenant", "player_id"])
    op.create_table(
        "fact_moves",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("fact_id", sa.BigInteger(), nullable=False),
        sa.Column("from_scope", sa.String(16), nullable=False),
        sa.Column("from_ref", sa.String(200), nullable=False),
        sa.Column("to_scope", sa.String(16), nullable=False),
        sa.Column("to_ref", sa.String(200), nullable=False),
        sa.Column("told_by", sa.String(64), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["fact_id"], ["facts.id"], name=op.f("fk_fact_moves_fact_id_facts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fact_moves")),
    )
    op.create_index(op.f("ix_fact_moves_fact_id"), "fact_moves", ["fact_id"])
    op.create_table(
        "summaries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("merged_into", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_summaries_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["merged_into"],
            ["summaries.id"],
            name=op.f("fk_summaries_merged_into_summaries"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_summaries")),
        sa.UniqueConstraint("conversation_id", "level", "first_seq", "last_seq", name="uq_summaries_range"),
    )
    op.create_table(
        "memory_jobs",
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("token", sa.Uuid(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_through", sa.Integer(), server_default="0", nullable=False),
        sa.Column("queued_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_memory_jobs_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "kind", name=op.f("pk_memory_jobs")),
    )

    for table in ("messages", "story_events", "facts"):
        op.add_column(
            table, sa.Column("embedding_next", pgvector.sqlalchemy.vector.VECTOR(dim=settings.embedding_dim), nullable=True)
        )
    op.create_table(
        "reembed_progress",
        sa.Column("table_name", sa.String(32), nullable=False),
        sa.Column("embedder", sa.Text(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("table_name", name=op.f("pk_reembed_progress")),
    )


def downgrade() -> None:
    op.drop_table("reembed_progress")
    for table in ("messages", "story_events"):
        op.drop_column(table, "embedding_next")
    op.drop_table("memory_jobs")
    op.drop_table("summaries")
    op.drop_index(op.f("ix_fact_moves_fact_id"), table_name="fact_moves")
    op.drop_table("fact_moves")
    op.drop_index("ix_facts_tenant_player", table_name="facts")
    op.drop_table("facts")
