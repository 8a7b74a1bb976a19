"""The stored vectors' embedder gets a fingerprint of its weights beside its name (vector_space)

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-01 07:10:00

The fingerprint is the embedder's vector of a fixed probe text (worker/embedder.py), so two
embedders of one name and other weights are told apart. A row recorded before has none: the first
process of that name to load its embedder fills it in (db/vector_space.py). Unconstrained `vector`:
the probe vector has the embedder's own dimension, which may not be the vector columns'.
"""

from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("vector_space", sa.Column("fingerprint", pgvector.sqlalchemy.Vector(), nullable=True))


def downgrade() -> None:
    op.drop_column("vector_space", "fingerprint")
