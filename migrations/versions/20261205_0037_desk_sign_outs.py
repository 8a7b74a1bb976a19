"""Desk sessions ended by signing out

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-05 15:00:00

The desk's session cookie is signed, not stored: signing out deleted it from the browser, but a copy
of it (a shared machine's cookie jar, a proxy's log) opened the desk until it expired, twelve hours
later. Signing out now records the session's signature until that expiry, and the desk refuses a
recorded one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0037"
down_revision: str | None = "0036"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "desk_sign_outs",
        sa.Column("session_mac", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_desk_sign_outs_expires_at", "desk_sign_outs", ["expires_at"])


def downgrade() -> None:
    op.drop_table("desk_sign_outs")
