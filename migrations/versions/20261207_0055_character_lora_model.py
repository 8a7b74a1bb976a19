"""A character's adapter answers the turns of the model it was trained on alone

Revision ID: 0055
Revises: 0054
Create Date: 2026-12-07 22:00:00

A fleet serving several models (compose's three) applied a character's registered adapter to its
turns on every model: one trained on SOLAR failed every turn of the character on gpt-oss
(`adapter_unavailable`, its shapes do not fit) and was applied unsaid to EEVE's (SOLAR's shapes).
`lora_model` names the model the adapter was trained on (its training record's `model`, or `mlchat
lora register --model`); the character's turns on other models get the base model. NULL: every
model's turns, as before (adapters registered before this revision: register them again to bind
each to its model). A downgrade drops the column, and every adapter answers every model again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0055"
down_revision: str | None = "0054"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("characters", sa.Column("lora_model", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("characters", "lora_model")
