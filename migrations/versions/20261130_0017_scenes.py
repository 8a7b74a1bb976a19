"""Scenes: group conversations (conversation_members), the speaker of each stored line
(messages.speaker_id, speaker_name), the member a turn speaks as (turns.character_id), and scenes
advanced step by step (scenes; turns.scene_id, scene_step, one turn per step)

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversation_members",
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("character_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("talkativeness", sa.Float(), server_default="0.5", nullable=False),
        sa.Column("muted", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("emotion", sa.String(length=16), server_default="neutral", nullable=False),
        sa.Column("affinity", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "talkativeness >= 0 AND talkativeness <= 1",
            name=op.f("ck_conversation_members_talkativeness_bounded"),
        ),
        sa.CheckConstraint(
            "affinity BETWEEN -100 AND 100", name=op.f("ck_conversation_members_affinity_bounded")
        ),
        sa.ForeignKeyConstraint(
            ["character_id"],
            ["characters.id"],
            name=op.f("fk_conversation_members_character_id_characters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_members_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "character_id", name=op.f("pk_conversation_members")),
    )
    op.create_table(
        "scenes",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("custom_id", sa.String(length=200), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "open", "ended", "failed", "cancelled", name="scene_status", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("rules", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("allow_repeat", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("exchanges", sa.Integer(), nullable=False),
        sa.Column("steps_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("end_phrase", sa.Text(), nullable=True),
        sa.Column("premise", sa.Text(), server_default="", nullable=False),
        sa.Column("params", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("seed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("lane", sa.String(length=8), server_default="bulk", nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("ended_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "steps_done >= 0 AND steps_done <= exchanges", name=op.f("ck_scenes_steps_bounded")
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_scenes_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_scenes_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scenes")),
        sa.UniqueConstraint("conversation_id", name=op.f("uq_scenes_conversation_id")),
        sa.UniqueConstraint("run_id", "custom_id", name="uq_scenes_run_id_custom_id"),
    )
    op.add_column("messages", sa.Column("speaker_id", sa.Integer(), nullable=True))
    op.add_column("messages", sa.Column("speaker_name", sa.String(length=200), nullable=True))
    op.create_foreign_key(
        op.f("fk_messages_speaker_id_characters"),
        "messages",
        "characters",
        ["speaker_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column("turns", sa.Column("character_id", sa.Integer(), nullable=True))
    op.add_column("turns", sa.Column("scene_id", sa.BigInteger(), nullable=True))
    op.add_column("turns", sa.Column("scene_step", sa.Integer(), nullable=True))
    op.create_foreign_key(
        op.f("fk_turns_character_id_characters"), "turns", "characters", ["character_id"], ["id"]
    )
    op.create_foreign_key(
        op.f("fk_turns_scene_id_scenes"), "turns", "scenes", ["scene_id"], ["id"], ondelete="CASCADE"
    )
    op.create_index(
        "uq_turns_scene_step",
        "turns",
        ["scene_id", "scene_step"],
        unique=True,
        postgresql_where=sa.text("scene_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_turns_scene_step", table_name="turns", postgresql_where=sa.text("scene_id IS NOT NULL"))
    op.drop_constraint(op.f("fk_turns_scene_id_scenes"), "turns", type_="foreignkey")
    op.drop_constraint(op.f("fk_turns_character_id_characters"), "turns", type_="foreignkey")
    for name in ("scene_step", "scene_id", "character_id"):
        op.drop_column("turns", name)
    op.drop_constraint(op.f("fk_messages_speaker_id_characters"), "messages", type_="foreignkey")
    op.drop_column("messages", "speaker_name")
    op.drop_column("messages", "speaker_id")
    op.drop_table("scenes")
    op.drop_table("conversation_members")
