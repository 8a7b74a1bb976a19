"""The writers' desk: turn_reviews (a reply's review state: its label, the original text, a version
for conditional updates) and turn_review_changes (every change, with who and when)

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "turn_reviews",
        sa.Column("turn_id", sa.Uuid(), nullable=False),
        sa.Column("original_reply", sa.Text(), nullable=False),
        sa.Column("original_quality", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("label", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("edited", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("label IN ('approved', 'rejected')", name=op.f("ck_turn_reviews_label_known")),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_turn_reviews_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("turn_id", name=op.f("pk_turn_reviews")),
    )
    op.create_table(
        "turn_review_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("turn_id", sa.Uuid(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("before", sa.Text(), nullable=True),
        sa.Column("after", sa.Text(), nullable=True),
        sa.Column("candidate", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_turn_review_changes_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turn_review_changes")),
    )
    op.create_index(
        op.f("ix_turn_review_changes_turn_id"), "turn_review_changes", ["turn_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_turn_review_changes_turn_id"), table_name="turn_review_changes")
    op.drop_table("turn_review_changes")
    op.drop_table("turn_reviews")
