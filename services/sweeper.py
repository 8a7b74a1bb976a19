"""Recover what a crash can leave behind: turns whose queue message is gone, submissions that died.

The turn row is the source of truth, but a message can still vanish: Redis killed before its
append-only file reached the disk, a FLUSHALL, a worker that could not re-send a batch. Such a turn
stays `queued` (or `running` under a lease nobody renews) with nothing behind it.

`resend_stranded` counts what workers hold before it re-sends anything:
- a queued turn is re-sent only when its last message went out (`dispatched_at`) longer ago than
  the broker's visibility timeout, so any message a worker had prefetched or held on a countdown
  would have been redelivered by now, and only when no message can be waiting for it in its lane
  queue: the queue is empty, or its last message went out before the oldest message waiting there
  (the queue is first in, first out), so lost bulk turns are recovered behind a bulk backlog too;
- a running turn as soon as its lease expired: a worker still answering it keeps renewing the
  lease, and the message it took is not in the queue (Redis would hand it back only after the
  visibility timeout, an hour by default: a lost reply for live chat). That re-send is recorded
  (`dispatched_at`, as for a queued turn, and as a claim records the one it asks for when a later
  turn finds it stalled), so the next sweeps treat it like a queued turn with a message out rather
  than sending it again each time;
A scene step is created (unsent) by the store of the step before it and sent by that worker once
committed; one still unsent a lease after its creation (that worker died) is sent at once.
A duplicate message would be harmless anyway: the claim finds the turn taken or finished and the
reply is stored once. A run's lines stored but never sent belong to its submission (resubmitting
the file sends them), so they are not swept; a CLI submission that died is marked `failed` instead,
with the way to resume it, and a batch's is tried again from its stored file (services/batches.py,
`retry_batch_submissions`, which housekeeping runs). Run it from cron or a scheduler
(`mlchat sweep`); it is safe at any time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, false, func, literal_column, or_, select
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from core.settings import Lane, settings
from db.models import TURN_UNFINISHED, Run, RunStatus, Turn, TurnStatus
from db.params import any_of
from db.runs import (
    abandoned_submissions,
    cancel_run,
    fail_submission,
    run_counts,
    submission_lock,
    submission_went_on,
)
from db.session import session_scope
from db.turns import fail_unserved, lapsed_and_unsent, live_models_waiting, mark_dispatched, resend_lock
from services.producer import tell_ended
from services.runs.control import interrupted_message, stored_lines
from tasks.generate import dispatch
from tasks.queues import held_and_empty, oldest_waiting_turn_ids, queue_depth

# Between stamping `dispatched_at` and the message reaching the queue (a commit, a broker round):
# a queued turn counts as sent before the oldest waiting message only if it went out this much earlier.
SEND_SLACK = timedelta(seconds=60)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stranded:
    """A turn no worker holds: queued, or running under an expired lease and re-sent since, with its
    last message sent at `dispatched_at`; or running under an expired lease with no message sent
    since (`dispatched_at` None: the message it came from was taken by a worker)."""

    id: uuid.UUID
    dispatched_at: datetime | None


def find_stranded(
    *,
    older_than_s: float,
    models: Sequence[str],
    limit: int,
    waiting: Mapping[tuple[str, Lane], datetime | None] | None = None,
    held: tuple[set[uuid.UUID], set[tuple[str, Lane]]] | None = None,
) -> dict[tuple[str, Lane], list[Stranded]]:
    """Turns no worker holds: queued (or running under an expired lease and re-sent since) with no
    message sent for `older_than_s`, or running under an expired lease with none sent since it
    expired; grouped by (model, lane), oldest first. `waiting` names the queues with messages waiting
    and when the oldest of them went out (None: unknown): of those queues only turns sent before it
    (or never re-sent) are taken, in the query itself, so a backlog never fills the limit.
    `held`: the turns whose messages workers hold (unacked) and the queues that hold nothing, read
    together (tasks/queues.py::held_and_empty): a queued turn of such a queue (or a running one under an
    expired lease, re-sent since), sent a lease ago and held by no worker, has lost its message (a Redis
    failover dropped the last writes, an eviction, a flush) and is taken too, without waiting out
    `older_than_s` (an hour by default, its conversation stalled meanwhile); so is one of a queue with
    messages waiting that went out before the oldest of them. A turn of no run is taken for
    the live lane; one the Python API sent on the bulk lane (`lane`) and still waiting behind a bulk
    backlog is then sent on the live lane too, and answered from whichever copy a worker takes first
    (turns record no lane: a bulk backlog must not hide a lost player's turn)."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    lease_gone = and_(
        Turn.status == TurnStatus.RUNNING, func.coalesce(Turn.lease_until, Turn.started_at) < func.now()
    )
    sent_long_ago = and_(or_(Turn.status == TurnStatus.QUEUED, lease_gone), Turn.dispatched_at < cutoff)
    # A scene step created by a store whose worker died before sending it: never sent, so no
    # message can be waiting for it; a lease after its creation, a live worker would have sent it.
    # A run's step 1 is its submission's to send, like the run's lines.
    step_unsent = and_(
        Turn.status == TurnStatus.QUEUED,
        Turn.scene_id.is_not(None),
        Turn.dispatched_at.is_(None),
        or_(Turn.run_id.is_(None), Turn.scene_step > 1),
        Turn.created_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.lease_seconds),
    )
    unsent = or_(lapsed_and_unsent(Turn), step_unsent)
    stranded = or_(sent_long_ago, and_(lease_gone, unsent), step_unsent)
    # A queued turn whose queue holds nothing and that no worker holds has lost its message once a
    # lease and the send slack have passed since it went out (a worker that took it would have
    # claimed it well before).
    lost_after = func.make_interval(0, 0, 0, 0, 0, 0, settings.lease_seconds + SEND_SLACK.total_seconds())
    groups: dict[tuple[str, Lane], list[Stranded]] = {}

    def held_by_no_worker() -> Any:
        """Queued (or running under a lapsed lease and re-sent since), sent a lease and the slack
        ago, and no worker holds its message."""
        assert held is not None
        return and_(
            # A running turn whose lease lapsed and that was sent again since (review: queued
            # alone, so its lost re-send waited for `sent_long_ago`, an hour).
            or_(Turn.status == TurnStatus.QUEUED, lease_gone),
            Turn.dispatched_at < func.now() - lost_after,
            # One array parameter (review: a bind per held id went past 65,535 with a bulk run's
            # deferred lines held, and every sweep failed).
            ~any_of(Turn.id, held[0], PG_UUID(as_uuid=True)),
        )

    # One query per model and lane, each with its own limit: a run's backlog still waiting in its
    # queue (older than the cutoff, so it matches until its queue is read below) must not fill the
    # limit ahead of another queue's lost turns, a live player's above all.
    with session_scope() as session:
        for model in dict.fromkeys(models):
            for lane, of_lane in (("live", Turn.run_id.is_(None)), ("bulk", Turn.run_id.is_not(None))):
                found: Any = stranded
                if waiting is not None and (model, lane) in waiting:
                    oldest = waiting[(model, lane)]  # type: ignore[index]
                    # In UTC: a datetime in the session's zone is subtracted on its wall clock, a
                    # DST change moving the cutoff an hour (review, stop 75).
                    lost = (
                        Turn.dispatched_at < oldest.astimezone(UTC) - SEND_SLACK
                        if oldest is not None
                        else false()
                    )
                    found = and_(stranded, or_(unsent, lost))
                    if held is not None:
                        # Sent before the oldest message waiting, so not in the queue, and held by no
                        # worker: lost (review of Redis losing state: a failover that dropped the
                        # last writes left a player's turn an hour behind a queue never empty).
                        found = or_(found, and_(lost, held_by_no_worker()))
                elif held is not None and (model, lane) in held[1]:  # nothing waits in this queue
                    found = or_(stranded, held_by_no_worker())
                query = select(Turn.id, unsent, Turn.dispatched_at).where(
                    found, Turn.model == model, of_lane, _UNFINISHED
                )
                rows = session.execute(query.order_by(Turn.number).limit(limit)).all()
                if rows:
                    groups[(model, lane)] = [  # type: ignore[index]
                        Stranded(turn_id, None if never_resent else sent_at)
                        for turn_id, never_resent, sent_at in rows
                    ]
    return groups


# What every arm of a stranded turn's test implies, its statuses as literals (as the claim's): a
# prepared statement's generic plan proves from them the partial indexes of unfinished turns, the
# live lane's by model first (migration 0052; review at fleet scale: it walked every bulk line).
_UNFINISHED = Turn.status.in_([literal_column(f"'{s.value}'") for s in TURN_UNFINISHED])


def _oldest_waiting_sent_at(model: str, lane: Lane) -> datetime | None:
    """When the oldest message waiting in the lane queue went out (its turns' `dispatched_at`);
    None when the queue is empty or that cannot be told."""
    ids = oldest_waiting_turn_ids(model, lane)
    if not ids:
        return None
    with session_scope() as session:
        return session.scalar(select(func.min(Turn.dispatched_at)).where(Turn.id.in_(ids)))


def resend_stranded(
    *, older_than_s: float | None = None, models: Sequence[str] | None = None, limit: int = 100_000
) -> dict[str, int] | None:
    """Re-send stranded turns no message in their queue can be for; returns {queue: turns re-sent},
    or None when another sweep is re-sending them (this one leaves them to it)."""
    with resend_lock() as mine:
        if not mine:
            logger.info("another sweep is re-sending stranded turns; this one leaves them to it")
            return None
        return _resend_stranded(older_than_s, models, limit)


def _resend_stranded(older_than_s: float | None, models: Sequence[str] | None, limit: int) -> dict[str, int]:
    models = list(dict.fromkeys(models or settings.models))
    # Which queues hold messages, and since when, read before the turns. A message sent meanwhile
    # (a worker's re-send, a submission's chunk) can make this sweep send a turn twice: a duplicate,
    # which its claim finds taken or finished; nothing lost is missed, and the next sweep reads anew.
    lanes: list[tuple[str, Lane]] = [(model, lane) for model in models for lane in ("live", "bulk")]
    waiting: dict[tuple[str, Lane], datetime | None] = {
        (model, lane): _oldest_waiting_sent_at(model, lane)
        for model, lane in lanes
        if queue_depth(model, lane)
    }
    groups = find_stranded(
        older_than_s=settings.visibility_timeout if older_than_s is None else older_than_s,
        models=models,
        limit=limit,
        waiting=waiting,
        # A message a worker holds (kombu's unacked hash) is its for a lease and the send slack after
        # its delivery or its countdown's end: a worker that took it would have claimed its turn well
        # before; past it, the worker died holding it, and kombu would give it back only after the
        # visibility timeout.
        held=held_and_empty(lanes, held_for_s=settings.lease_seconds + SEND_SLACK.total_seconds()),
    )
    sent: dict[str, int] = {}
    failed: list[str] = []
    for (model, lane), turns in groups.items():
        try:
            ids = _resend_group(model, lane, turns)
        except Exception:  # one queue's failure (the broker away) leaves the other queues swept
            logger.warning("could not re-send the stranded turns of %s/%s", model, lane, exc_info=True)
            failed.append(f"{model}/{lane}")
            continue
        if ids:
            sent[f"{model}/{lane}"] = len(ids)
    if failed:
        raise SweepIncomplete(f"could not re-send the stranded turns of {', '.join(failed)}", sent)
    return sent


class SweepIncomplete(RuntimeError):
    """Some queues' stranded turns could not be re-sent; `sent` has what the others re-sent."""

    def __init__(self, message: str, sent: dict[str, int]) -> None:
        super().__init__(message)
        self.sent = sent


def _resend_group(model: str, lane: Lane, turns: list[Stranded]) -> list[uuid.UUID]:
    """Re-send one queue's stranded turns (find_stranded left out those a waiting message may be
    for); their ids."""
    ids = [t.id for t in turns]
    if ids:
        dispatch(ids, model=model, lane=lane)
        with session_scope() as session:
            mark_dispatched(session=session, turn_ids=ids)
    return ids


UNSERVED_CHUNK = 1000  # turns failed a transaction
# A mark not renewed by a sweep for this long (or the setting, if longer) starts afresh: sweeps a
# minute apart (compose), or a cron's few, renew it; one tied to the setting alone never failed
# anything once sweeps ran further apart than the setting (review).
MARK_RENEWAL_S = 900.0


def fail_unserved_live_turns() -> dict[str, int]:
    """Fail the live turns of each model no worker has consumed for MLCHAT_UNSERVED_MODEL_FAIL_S
    (model_unavailable), those queued that long: {model: turns failed}. Each sweep asks the workers
    which queues they consume (Celery's remote control) and marks when it first found a model with
    live turns waiting unserved; a model served again, or with none waiting, loses its mark. A sweep
    that learns nothing (the broker away, no worker answering at all) fails nothing."""
    from tasks.presence import served_models, unserved_for

    limit_s = settings.unserved_model_fail_s
    if not limit_s:
        return {}
    with session_scope() as session:  # any waiting: a model is marked from its first sweep unserved
        waiting = live_models_waiting(session=session)
    served = served_models() if waiting else set()
    # Nothing learnt (the broker away, no worker answering): no sweep found a model unserved, and
    # the count starts again at the next that does.
    absent = unserved_for(
        waiting if served is not None else [], served or set(), renewed_within_s=max(limit_s, MARK_RENEWAL_S)
    )
    failed: dict[str, int] = {}
    for model, absent_s in absent.items():
        if absent_s < limit_s:
            continue
        reason = (
            f"no worker has served model {model!r} for {absent_s:.0f} s (MLCHAT_UNSERVED_MODEL_FAIL_S): "
            "start its workers, or send the turn to another model"
        )
        while True:
            with session_scope() as session:
                chunk = fail_unserved(
                    session=session, model=model, older_than_s=limit_s, reason=reason, limit=UNSERVED_CHUNK
                )
            failed[model] = failed.get(model, 0) + len(chunk)
            # Their callbacks now, and their streams' ends: found as lost callbacks five minutes on,
            # they came late (review), and readers waited for a status check.
            tell_ended(chunk)
            if len(chunk) < UNSERVED_CHUNK:
                break
        logger.warning("failed %d live turn(s) of model %s: %s", failed[model], model, reason)
    return {model: n for model, n in failed.items() if n}


def close_abandoned_runs(*, older_than_s: float = 60.0) -> dict[str, str]:
    """CLI runs whose submission died: `validating` → `failed` with how to resume (a batch's is
    retried from its stored file instead, by housekeeping); a cancel whose submitter died is
    finished. Returns {run name: what was done}."""
    done: dict[str, str] = {}
    with session_scope() as session:
        abandoned = sorted(
            run.id for run in abandoned_submissions(session=session, older_than_s=older_than_s)
        )
        cancelling = sorted(session.scalars(select(Run.id).where(Run.status == RunStatus.CANCELLING)).all())
    # A transaction a run: a run's row stays locked to the end of the transaction that advanced it,
    # and a worker storing turns of several runs locks their rows in id order, so a sweep holding
    # one run while it waited for another's could deadlock with it (and one failure rolled back all).
    # Each under the run's submission lock, taken or skipped (never read and then acted on: a resume
    # taking the lock and committing between the look and the write had its run failed under it).
    for run_id in abandoned:
        with session_scope() as session:
            name = session.get_one(Run, run_id).name
        with submission_lock(name) as free, session_scope() as session:
            if not free:  # resumed since the list was read
                continue
            # its turns read again under the lock: a chunk stored since the look (review)
            if submission_went_on(session=session, run_id=run_id, within_s=older_than_s):
                continue
            run = session.get_one(Run, run_id)
            counts = run_counts(session=session, run_id=run_id)
            error = interrupted_message(run, counts, stored_lines(session, run_id, counts))
            if fail_submission(session=session, run_id=run_id, error=error, error_code="server_error"):
                done[name] = "failed: submission interrupted"
    for run_id in cancelling:
        with session_scope() as session:
            name = session.get_one(Run, run_id).name
        with submission_lock(name) as free, session_scope() as session:
            if free:
                outcome = cancel_run(session=session, run_id=run_id)
                if outcome.cancelled_turns or outcome.after != outcome.before:
                    done[name] = f"cancel finished: {outcome.cancelled_turns} turns, now {outcome.after}"
    return done
