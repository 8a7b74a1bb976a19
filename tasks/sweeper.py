"""Re-send turns whose queue message is gone.

The turn row is the source of truth, but a message can still vanish: Redis killed before its
append-only file reached the disk, a FLUSHALL, a producer killed between its commit and its send.
Such a turn stays `queued` (or `running`, if its worker died too) with nothing behind it.

`resend_stranded` re-sends a turn only when (1) nothing has touched it for longer than the broker's
visibility timeout, so Redis would already have redelivered any message a worker still held, and
(2) its model's lane queue is empty, so no message is waiting for it behind a backlog. If a message
existed after all, the duplicate is harmless: claiming is idempotent and the reply is stored once.
Run it from cron or a scheduler (`mlchat sweep`); it is safe at any time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, or_, select

from core.settings import Lane, settings
from db.models import Turn, TurnStatus
from db.session import session_scope
from tasks.generate import dispatch
from tasks.queues import queue_depth


def find_stranded(
    *, older_than_s: float, models: Sequence[str], limit: int
) -> dict[tuple[str, Lane], list[uuid.UUID]]:
    """Unfinished turns untouched for `older_than_s`, grouped by (model, lane), oldest first."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    touched = func.coalesce(Turn.started_at, Turn.created_at)
    with session_scope() as session:
        rows = session.execute(
            select(Turn.id, Turn.model, Turn.run_id)
            .where(
                or_(Turn.status == TurnStatus.QUEUED, Turn.status == TurnStatus.RUNNING),
                touched < cutoff,
                Turn.model.in_(list(models)),
            )
            .order_by(Turn.number)
            .limit(limit)
        ).all()
    groups: dict[tuple[str, Lane], list[uuid.UUID]] = {}
    for turn_id, model, run_id in rows:
        lane: Lane = "bulk" if run_id is not None else "live"
        groups.setdefault((model, lane), []).append(turn_id)
    return groups


def resend_stranded(
    *, older_than_s: float | None = None, models: Sequence[str] | None = None, limit: int = 100_000
) -> dict[str, int]:
    """Re-send stranded turns of lanes whose queue is empty; returns {queue: turns re-sent}."""
    groups = find_stranded(
        older_than_s=settings.visibility_timeout if older_than_s is None else older_than_s,
        models=models or settings.models,
        limit=limit,
    )
    sent: dict[str, int] = {}
    for (model, lane), ids in groups.items():
        if queue_depth(model, lane):
            continue  # messages are waiting: these turns may be among them
        dispatch(ids, model=model, lane=lane)
        sent[f"{model}/{lane}"] = len(ids)
    return sent
