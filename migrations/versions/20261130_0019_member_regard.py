"""Group members' moods toward each other (conversation_members.regard, {other member's character
id: affinity}) and the narrator as a scene participant (scenes.narrator)

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-30 22:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "conversation_members",
        sa.Column("regard", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
    )
    op.add_column("scenes", sa.Column("narrator", postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column("scenes", "narrator")
    op.drop_column("conversation_members", "regard")
