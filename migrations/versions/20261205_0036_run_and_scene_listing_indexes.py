"""Indexes for listing a tenant's runs and a run's scenes

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-05 12:00:00

A tenant's runs and batches are listed newest first (the desk's runs page, `GET /v1/batches`; an
admin's of every tenant, `mlchat run list`), and a
run's scenes in custom_id order (the desk's run page, the scene export's pages): with no index on
either order, each page sorted every run of the table, and each page of a scene export every scene of
the run (a run of 100k scenes: the export sorted them all once a page).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0036"
down_revision: str | None = "0035"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0032: runs and scenes are written while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_runs_tenant_created_at", "runs", ["tenant", "created_at", "id"])
        create_index_concurrently("ix_runs_created_at", "runs", ["created_at", "id"])  # an admin's, all tenants
        create_index_concurrently(
            "ix_scenes_run_custom_id_order", "scenes", ["run_id", sa.text("coalesce(custom_id, '')"), "id"]
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_scenes_run_custom_id_order", "scenes")
        drop_index_concurrently("ix_runs_created_at", "runs")
        drop_index_concurrently("ix_runs_tenant_created_at", "runs")
