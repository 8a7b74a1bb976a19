"""Recover what a crash can leave behind: turns whose queue message is gone, submissions that died.

The turn row is the source of truth, but a message can still vanish: Redis killed before its
append-only file reached the disk, a FLUSHALL, a worker that could not re-send a batch. Such a turn
stays `queued` (or `running` under a lease nobody renews) with nothing behind it.

`resend_stranded` counts what workers hold before it re-sends anything:
- a queued turn is re-sent only when its last message went out (`dispatched_at`) longer ago than
  the broker's visibility timeout, so any message a worker had prefetched or held on a countdown
  would have been redelivered by now, and only when its lane queue is empty (no message waiting
  for it behind a backlog);
- a running turn only when its lease expired longer ago than the visibility timeout: a worker
  still answering it keeps renewing the lease.
A duplicate message would be harmless anyway: the claim finds the turn taken or finished and the
reply is stored once. A run's lines stored but never sent belong to its submission (resubmitting
the file sends them), so they are not swept; a CLI submission that died is marked `failed` instead,
with the way to resume it, and a batch's is tried again from its stored file (services/batches.py,
`retry_batch_submissions`, which housekeeping runs). Run it from cron or a scheduler
(`mlchat sweep`); it is safe at any time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import and_, func, or_, select

from core.settings import Lane, settings
from db.models import Run, RunStatus, Turn, TurnStatus
from db.runs import (
    abandoned_submissions,
    cancel_run,
    fail_submission,
    run_counts,
    submission_alive,
)
from db.session import session_scope
from db.turns import mark_dispatched
from services.runs.control import interrupted_message
from tasks.generate import dispatch
from tasks.queues import queue_depth


def find_stranded(
    *, older_than_s: float, models: Sequence[str], limit: int
) -> dict[tuple[str, Lane], list[uuid.UUID]]:
    """Turns no worker holds and no message has been sent for in `older_than_s`, grouped by
    (model, lane), oldest first."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    queued_long = and_(Turn.status == TurnStatus.QUEUED, Turn.dispatched_at < cutoff)
    lease_long_gone = and_(
        Turn.status == TurnStatus.RUNNING, func.coalesce(Turn.lease_until, Turn.started_at) < cutoff
    )
    with session_scope() as session:
        rows = session.execute(
            select(Turn.id, Turn.model, Turn.run_id)
            .where(or_(queued_long, lease_long_gone), Turn.model.in_(list(models)))
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
        with session_scope() as session:
            mark_dispatched(session=session, turn_ids=ids)
        sent[f"{model}/{lane}"] = len(ids)
    return sent


def close_abandoned_runs(*, older_than_s: float = 60.0) -> dict[str, str]:
    """CLI runs whose submission died: `validating` → `failed` with how to resume (a batch's is
    retried from its stored file instead, by housekeeping); a cancel whose submitter died is
    finished. Returns {run name: what was done}."""
    done: dict[str, str] = {}
    with session_scope() as session:
        for run in abandoned_submissions(session=session, older_than_s=older_than_s):
            error = interrupted_message(run, run_counts(session=session, run_id=run.id))
            if fail_submission(session=session, run_id=run.id, error=error, error_code="server_error"):
                done[run.name] = "failed: submission interrupted"
        cancelling = session.scalars(select(Run).where(Run.status == RunStatus.CANCELLING)).all()
        for run in cancelling:
            if not submission_alive(session=session, name=run.name):
                outcome = cancel_run(session=session, run_id=run.id)
                if outcome.cancelled_turns or outcome.after != outcome.before:
                    done[run.name] = f"cancel finished: {outcome.cancelled_turns} turns, now {outcome.after}"
    return done
