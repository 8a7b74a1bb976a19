"""A callback that a burst of tries did not deliver is tried again later

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-03 10:30:00

A callback was tried MLCHAT_CALLBACK_MAX_ATTEMPTS times by Celery in about two to four minutes and
then given up for good, and a retry message lost to a broker blip dropped it too: a receiver down
for five minutes never got its batch's or turn's result. Each failed try now sets when the callback
is due again (runs.callback_retry_at, turns.callback_retry_at), later than any Celery retry of the
burst; housekeeping tries it again from then on, less often each time, until
MLCHAT_CALLBACK_RETRY_WINDOW_S after its run or turn finished. Callbacks that gave up before this
revision stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # If not there yet: the autocommit block below commits them before the index is built, so an
    # upgrade run again after an interrupted build (the revision still 0026) finds them in place.
    for table in ("runs", "turns"):
        op.add_column(table, sa.Column("callback_retry_at", sa.DateTime(timezone=True)), if_not_exists=True)
    # CONCURRENTLY, as in 0018: turns are written all the time, also while the index builds.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_turns_callback_retry_at",
            "turns",
            ["callback_retry_at"],
            postgresql_where=sa.text("callback_retry_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_turns_callback_retry_at", "turns")
    for table in ("runs", "turns"):
        op.drop_column(table, "callback_retry_at")
