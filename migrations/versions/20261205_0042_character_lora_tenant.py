"""A character's adapter trained on one tenant's dialogue is served to that tenant alone

Revision ID: 0042
Revises: 0041
Create Date: 2026-12-05 20:00:00

`mlchat lora dataset` reads one tenant's conversations with a character, but the adapter trained on
them was served to every tenant's turns of the character (characters are the deployment's): one
studio's players' history and names, in a voice answering another's. `lora_tenant` names the tenant
whose dialogue trained the registered adapter; other tenants' turns of the character get the base
model. NULL: trained on the card alone (or registered to serve every tenant), as before. Adapters
registered before this revision stay NULL, every tenant's: register them again (`mlchat lora
register`) to have each answer the tenant whose dialogue trained it. A downgrade drops the column,
and every adapter answers every tenant again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0042"
down_revision: str | None = "0041"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("characters", sa.Column("lora_tenant", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("characters", "lora_tenant")
