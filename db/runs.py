"""The run state machine, and every query on bulk runs. Each transition is one conditional UPDATE:

    create / replace_file          → validating
    finish_submission  validating  → queued (then advanced: a run with no turns completes at once)
    fail_submission    validating  → failed (bad file: `invalid_request`; a CLI submission that died,
                       or a batch's out of tries: `server_error`; resubmitting a CLI run resumes it)
    begin_submission_attempt / postpone_submission  validating → validating: a batch's tries are
                       counted, and one that hit a transient error waits for its retry
    resume_submission  failed | validating (no live submitter) → validating
    advance            queued → in_progress → completed;  cancelling → cancelled (or expired);
                       a run that writes output files (an HTTP batch) goes to finalizing instead
    finish_finalizing  finalizing → completed | cancelled | expired, once its files are written
    postpone_finalizing  finalizing → finalizing (its files failed: tried again later), or → failed
                       once they have failed for MLCHAT_FINALIZE_GIVE_UP_HOURS (`server_error`)
    cancel             validating | queued | in_progress → cancelling (→ cancelled once nothing runs)
    expire             the same, for live runs past expires_at: their unstarted turns are cancelled
    reopen             completed | in_progress → in_progress (failed turns queued again)

`advance` runs in every transaction that finishes turns (db/turns.py), so the run never lags its
turns. Nothing here is called from a read path. Two writers finishing the last turns at once would
each see the other's as unfinished (READ COMMITTED) and leave the run in progress for ever, so the
write that may end the run is taken under a row lock on the run: the last writer then sees every
other writer's turns. Only that write needs it. A run in progress whose transaction can pin (share
lock) one of its queued turns cannot end in it: that turn's finisher must wait for this commit and
advances the run then, seeing these turns finished. So the stores of a run with queued turns skip
its row instead of queueing on it (issue 28); its first store (queued → in_progress), those that
find no sent queued turn to pin (its tail) and those whose scene hook locked the run already still
take it. Locks are taken turns → runs → scenes; the pin never waits (SKIP LOCKED), so wherever it
falls in that order it closes no cycle.

A submission holds a PostgreSQL advisory lock on the run's name for as long as it runs, on its own
connection: a submitter that dies (SIGKILL included) drops its connection and with it the lock, so
"validating with no lock held" is exactly "a submission that died", readable by anyone.
"""

from __future__ import annotations

import logging
import secrets
import unicodedata
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Text,
    and_,
    case,
    exists,
    func,
    or_,
    select,
    text,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, defer

from db.advisory_locks import advisory_lock, held_by, name_key
from db.models import (
    RUN_FINISHED,
    RUN_LIVE,
    TURN_FINISHED,
    TURN_UNFINISHED,
    Conversation,
    Run,
    RunStatus,
    Scene,
    Turn,
    TurnStatus,
)
from db.params import any_of
from db.retry_seeds import retried_params
from db.scenes import advance_scenes_of_turns, cancel_open_scenes, reopen_failed_scenes
from db.session import given_or_own
from db.turn_leases import claimable
from structured.kinds import DATA_REPLIES

logger = logging.getLogger(__name__)

# Advisory locks are per database: the two-key form with a namespace keeps these apart from others.
_LOCK_NAMESPACE = 0x6D6C6372  # "mlcr"
_FIRST_ID, _LAST_ID = uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)


class RunConflict(ValueError):
    """A run name was reused for a different file."""


class NotRetryable(ValueError):
    """A run whose failed turns cannot be reopened in its state (the CLI's refusal: exit code 2)."""


class RunDeleting(RuntimeError):
    """The run's deletion past MLCHAT_RUN_RETENTION_DAYS began (db/retention.py): half deleted, it
    changes no more, and what is read of it is no longer whole."""

    def __init__(self, name: str) -> None:
        super().__init__(f"run {name} is being deleted: it ended longer ago than MLCHAT_RUN_RETENTION_DAYS")


def refuse_deleting(*, session: Session, run_id: uuid.UUID, name: str) -> None:
    """RunDeleting when the run's deletion began, or it is gone."""
    if session.scalar(select(Run.deleting_since.is_(None)).where(Run.id == run_id)) is not True:
        raise RunDeleting(name)


@dataclass(frozen=True)
class RunCounts:
    """request_counts of a run, from its turn rows (the database's truth, never a cached counter)."""

    total: int
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int
    unsent: int = 0  # stored but not sent yet: a submission still going, or one that died
    refused: int = 0  # well-formed requests refused by policy: never stored as turns

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def underway(self) -> int:
        """Turns being answered: stored, sent and not finished (an unsent one waits for a resume)."""
        return self.total - self.finished - self.unsent

    def requests(self, run_total: int) -> int:
        """A run's requests: its file's good lines or the turns it holds, whichever is more, and
        those refused by policy (never stored; answered failed in its error file)."""
        return max(run_total, self.total) + self.refused


def create_run(
    *,
    session: Session,
    name: str,
    model: str,
    file_hash: str,
    total: int,
    fields: dict[str, Any] | None = None,
) -> tuple[Run, bool]:
    """create: a run in `validating`, or the existing one of that name; (run, created).

    An existing run of another file is replaced only while it holds no turns and is not live
    (its validation failed, its submission died before storing a line, or every line of its file
    was skipped or refused); otherwise RunConflict.
    The caller holds the name's submission lock. `fields`: the run's other columns (format, options,
    metadata, window, files, callback), set on creation, on a replacement, and on a run of the same
    file that holds no turns yet (a submission that failed validation, sent again with other options).
    """
    fields = fields or {}
    run_id = session.scalar(
        insert(Run)
        .values(
            id=fields.pop("id", None) or uuid.uuid4(),
            name=name,
            model=model,
            file_hash=file_hash,
            total=total,
            status=RunStatus.VALIDATING,
            **fields,
        )
        .on_conflict_do_nothing(index_elements=[Run.name])
        .returning(Run.id)
    )
    if run_id is not None:
        return session.get_one(Run, run_id), True
    # Half deleted past retention, a run resumed or replaced would be deleted under its new lines.
    # No lock held for this check (one deadlocked with a cancel: review): each update below, and the
    # submission's resume, also asks for a run unmarked, and the submission checks once more before
    # it commits (a mark committed meanwhile is seen; one after waits for the row the submission
    # updated, then finds the run no longer finished: none to delete).
    run = session.scalars(select(Run).where(Run.name == name)).one()
    if run.deleting_since is not None:
        raise RunDeleting(name)
    if _reopen_empty(session=session, run_id=run.id):
        session.refresh(run)
    if run.file_hash == file_hash:
        if fields:  # a run that stored no line yet takes this submission's options and columns
            taken = session.scalar(
                update(Run)
                .where(
                    Run.id == run.id,
                    Run.status.in_((RunStatus.FAILED, RunStatus.VALIDATING)),
                    Run.deleting_since.is_(None),
                    ~exists().where(Turn.run_id == Run.id),
                )
                .values(**fields)
                .returning(Run.id)
            )
            if taken is None:  # marked, or deleted whole, since it was read: no row to refresh (review)
                refuse_deleting(session=session, run_id=run.id, name=name)
            session.refresh(run)
        return run, False
    replaced = session.scalar(
        update(Run)
        .where(
            Run.id == run.id,
            Run.status.in_((RunStatus.FAILED, RunStatus.VALIDATING)),
            Run.deleting_since.is_(None),
            ~exists().where(Turn.run_id == Run.id),
        )
        .values(
            file_hash=file_hash,
            total=total,
            model=model,
            status=RunStatus.VALIDATING,
            error=None,
            line_errors=None,
            **fields,
        )
        .returning(Run.id)
    )
    if replaced is None:
        refuse_deleting(session=session, run_id=run.id, name=name)  # marked meanwhile
        raise RunConflict(
            f"run {name!r} already holds turns from a different file; resubmit that file to resume it, "
            "or pick another --name"
        )
    session.refresh(run)
    return run, True


def _reopen_empty(*, session: Session, run_id: uuid.UUID) -> bool:
    """reopen_empty: a run that completed holding no turn (every line of its file skipped or refused)
    goes back to validating, to take its file again (with other options) or another one; not a
    batch's, whose output a client may have read. False if the run is no such one."""
    reopened = session.scalar(
        update(Run)
        .where(
            Run.id == run_id,
            Run.status == RunStatus.COMPLETED,
            Run.input_file_id.is_(None),
            Run.deleting_since.is_(None),
            ~exists().where(Turn.run_id == Run.id),
        )
        .values(status=RunStatus.VALIDATING, finished_at=None, refused=None, line_errors=None, error=None)
        .returning(Run.id)
    )
    return reopened is not None


def resume_submission(
    *,
    session: Session,
    run_id: uuid.UUID,
    total: int | None = None,
    input_format: str | None = None,
    refused: list[dict[str, Any]] | None = None,
) -> bool:
    """resume: a failed or interrupted submission goes back to validating (with the lines, the
    format and the refused requests its file was found to hold); False if the run moved on."""
    counted: dict[str, Any] = {} if total is None else {"total": total}
    if input_format is not None:
        counted["input_format"] = input_format
    return (
        session.scalar(
            update(Run)
            .where(
                Run.id == run_id,
                Run.status.in_((RunStatus.FAILED, RunStatus.VALIDATING)),
                Run.deleting_since.is_(None),  # its deletion past retention began meanwhile
            )
            .values(
                status=RunStatus.VALIDATING,
                error=None,
                error_code=None,
                line_errors=None,
                finished_at=None,
                refused=refused or None,
                **counted,
            )
            .returning(Run.id)
        )
        is not None
    )


def locked_in_id_order(session: Session, *where: Any) -> tuple[Any, ...]:
    """Row-lock the turns matching `where` in id order; the conditions, for the UPDATE over them that
    follows. Such an UPDATE over a whole run's turns (a cancel, an expiry in every worker's
    housekeeping, a failing submission, a retry of failed lines; a cancel of given turns, a failed
    send: db/turns.py) otherwise locks them in its plan's
    order (by turn number, or queued before running): two such, or one and a worker's store (in id
    order), deadlocked. The conditions stand in the UPDATE too, checked again on the rows as locked;
    a row another transaction made match between the two statements (a turn handed back to queued,
    one a concurrent submission stored) is locked by the UPDATE itself, in its plan's order: a
    narrow window, left.

    A statement of its own, counting what it locked: as the UPDATE's `id IN (locking subquery)`, the
    planner, reading a run's rows just inserted as one row (no statistics yet), joined the two in a
    nested loop that ran the locking subquery again for every row: a 100,000-line run's cancel ran
    for more than ten minutes, a million-line one's for hours."""
    # FOR NO KEY UPDATE, as the UPDATE itself takes: a foreign key's key-share lock (a review change
    # recorded on one of the turns) does not wait for it.
    locking = select(Turn.id).where(*where).order_by(Turn.id).with_for_update(key_share=True).subquery()
    session.execute(select(func.count()).select_from(locking))
    return where


def fail_submission(
    *,
    session: Session,
    run_id: uuid.UUID,
    error: str,
    error_code: Literal["invalid_request", "server_error", "empty_file"],
    line_errors: list[dict[str, Any]] | None = None,
    final: bool = False,
) -> bool:
    """fail_submission: validating → failed, with the reason, whose fault it was (`invalid_request`:
    the file's; `server_error`: the server's) and each bad line's; False if the run moved on.
    `final`: no resume will follow (an OpenAI batch): the turns its submission stored and not yet
    started are cancelled with it, so no worker answers a batch that writes no output."""
    if final:  # turns before the run: the lock order of every transaction that finishes turns
        # A running turn whose lease lapsed too (its worker gone), as cancel_run takes it: left
        # running, only a worker of its model claiming it again would end it.
        mine = (
            Turn.run_id == run_id,
            claimable(),
            select(Run.status).where(Run.id == run_id).scalar_subquery() == RunStatus.VALIDATING,
        )
        session.execute(
            update(Turn)
            .where(*locked_in_id_order(session, *mine))
            .values(
                status=TurnStatus.CANCELLED,
                finished_at=func.now(),
                lease_until=None,
                error="the batch's submission failed",
                error_code=None,
            )
        )
    failed = (
        session.scalar(
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.VALIDATING)
            .values(
                status=RunStatus.FAILED,
                error=error,
                error_code=error_code,
                line_errors=line_errors,
                submission_retry_at=None,
                finished_at=func.now(),
            )
            .returning(Run.id)
        )
        is not None
    )
    if failed and final:
        cancel_open_scenes(session=session, run_id=run_id, reason="the batch's submission failed")
    return failed


def begin_submission_attempt(*, session: Session, run_id: uuid.UUID) -> int | None:
    """A batch's submission starts a try (validating → validating); the tries so far, this one
    included, or None if the run left validating."""
    return session.scalar(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.VALIDATING)
        .values(submission_attempts=Run.submission_attempts + 1, submission_retry_at=None)
        .returning(Run.submission_attempts)
    )


def postpone_submission(
    *, session: Session, run_id: uuid.UUID, error: str, delay_s: float, refund: bool = False
) -> bool:
    """A batch's submission that hit a transient error stays validating and is due again in
    `delay_s`, saying why; False if the run left validating. `refund`: the try is not counted (the
    broker was away: the batch waits for it, within its completion window)."""
    attempts = func.greatest(Run.submission_attempts - 1, 0) if refund else Run.submission_attempts
    return (
        session.scalar(
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.VALIDATING)
            .values(
                error=error,
                submission_retry_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, delay_s),
                submission_attempts=attempts,
            )
            .returning(Run.id)
        )
        is not None
    )


def batch_submissions_due(*, session: Session, stalled_after_s: float) -> list[str]:
    """Batches still validating that nobody is submitting and whose retry is due (or, never
    postponed, that stalled longer than `stalled_after_s`: their submitter died)."""
    stalled = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, stalled_after_s)
    names = session.scalars(
        select(Run.name)
        .where(
            Run.status == RunStatus.VALIDATING,
            Run.input_file_id.is_not(None),
            or_(
                Run.submission_retry_at <= func.now(),
                and_(Run.submission_retry_at.is_(None), Run.created_at < stalled),
            ),
        )
        .order_by(Run.created_at)
    ).all()
    return [name for name in names if not submission_alive(session=session, name=name)]


def finish_submission(*, session: Session, run_id: uuid.UUID) -> RunStatus:
    """finish_submission: validating → queued, then advanced at once; returns the run's status after."""
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.VALIDATING)
        .values(status=RunStatus.QUEUED, in_progress_at=func.now())
    )
    advance_runs(session=session, run_ids=[run_id])
    status = run_status(session=session, run_id=run_id)
    assert status is not None
    return status


def run_options(*, session: Session, name: str) -> tuple[dict[str, Any] | None, bool, bool]:
    """The line options the run of that name was submitted with (None if there is no such run);
    whether it holds turns (stored under them: a resume keeps them); and whether its submission
    stopped part-way (still validating, or failed by the server's fault, not the file's)."""
    stopped = or_(
        Run.status == RunStatus.VALIDATING,
        and_(Run.status == RunStatus.FAILED, Run.error_code == "server_error"),
    )
    row = session.execute(
        select(Run.options, exists().where(Turn.run_id == Run.id), stopped).where(Run.name == name)
    ).first()
    return (None, False, False) if row is None else (row[0], bool(row[1]), bool(row[2]))


def conversations_of_others(
    *, session: Session, tenant: str, external_ids: Sequence[str], run_name: str
) -> set[str]:
    """Of these conversation names, those the tenant holds that are not the run's own (no turn and
    no scene of the run named `run_name` in them): a player's, a history import's, another run's
    line that named it. A run makes a line's own conversation in the transaction that stores its
    turn or scene, so one of its own always holds it."""
    own_run = select(Run.id).where(Run.name == run_name).scalar_subquery()
    return set(
        session.scalars(
            select(Conversation.external_id).where(
                Conversation.tenant == tenant,
                # one array parameter: a bind per name (10,000 of them) took 4x as long
                any_of(Conversation.external_id, set(external_ids), Text),
                ~exists().where(Turn.conversation_id == Conversation.id, Turn.run_id == own_run),
                ~exists().where(Scene.conversation_id == Conversation.id, Scene.run_id == own_run),
            )
        )
    )


def run_tenant(*, session: Session, name: str) -> str | None:
    """The tenant whose conversations the run of that name names; None if there is no such run."""
    return session.scalar(select(Run.tenant).where(Run.name == name))


def is_http_batch(*, session: Session, name: str) -> bool:
    """Whether the run of that name is a batch of the HTTP API (its input a file of /v1/files)."""
    return bool(session.scalar(select(Run.input_file_id.is_not(None)).where(Run.name == name)))


def run_status(*, session: Session, run_id: uuid.UUID) -> RunStatus | None:
    """The run's stored status."""
    status = session.scalar(select(Run.status).where(Run.id == run_id))
    return None if status is None else RunStatus(status)


def advance_runs(
    *, session: Session, run_ids: Sequence[uuid.UUID], locked: Collection[uuid.UUID] = ()
) -> None:
    """advance: queued → in_progress once a turn finished; → completed (or cancelling → cancelled)
    once none is queued or running. Locks the runs first, unless a pinned turn shows the run cannot
    end in this transaction: see the module's docstring. `locked`: runs this transaction has locked
    already (advance_runs_of_turns locks every run it advances in one pass), never pinned."""
    ids = sorted(set(run_ids))
    if not ids:
        return
    # Read without a lock: a stale in_progress is harmless (the pin alone decides), and a run in any
    # other state takes the locked path (queued → in_progress must be written; the rest are rare).
    # A run whose row this transaction holds gains nothing from a pin, and its queued turns may be
    # the scene steps it just created, which a pin would hide from mark_dispatched (SKIP LOCKED).
    held = set(locked)
    pinned = _pin_runs(session, [r for r in ids if r not in held])
    ids = [r for r in ids if r not in pinned]
    if not ids:
        return
    _lock_runs(session, [r for r in ids if r not in held])
    unfinished = exists().where(Turn.run_id == Run.id, Turn.status.in_(TURN_UNFINISHED))
    finished_any = exists().where(Turn.run_id == Run.id, Turn.status.in_(TURN_FINISHED))
    ending = case(
        (Run.input_file_id.is_not(None), RunStatus.FINALIZING.value),  # its files are written next
        (and_(Run.status == RunStatus.CANCELLING, Run.cancel_reason == "expired"), RunStatus.EXPIRED.value),
        (Run.status == RunStatus.CANCELLING, RunStatus.CANCELLED.value),
        else_=RunStatus.COMPLETED.value,
    )
    session.execute(
        update(Run)
        .where(
            Run.id.in_(ids),
            Run.status.in_((RunStatus.QUEUED, RunStatus.IN_PROGRESS, RunStatus.CANCELLING)),
            ~unfinished | and_(Run.status == RunStatus.QUEUED, finished_any),
        )
        .values(
            status=case((unfinished, RunStatus.IN_PROGRESS.value), else_=ending),
            # A run cancelled before it started (its submission's) ends with none: it never started.
            in_progress_at=case(
                (Run.status == RunStatus.CANCELLING, Run.in_progress_at),
                else_=func.coalesce(Run.in_progress_at, func.now()),
            ),
            finalizing_at=case((and_(~unfinished, Run.input_file_id.is_not(None)), func.now()), else_=None),
            finished_at=case((or_(unfinished, Run.input_file_id.is_not(None)), None), else_=func.now()),
        )
        .execution_options(synchronize_session=False)
    )


def _pin_runs(session: Session, run_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The in-progress runs of these a pinned queued turn shows cannot end in this transaction (a pin
    never waits: SKIP LOCKED)."""
    if not run_ids:
        return set()
    in_progress = session.scalars(
        select(Run.id).where(Run.id.in_(list(run_ids)), Run.status == RunStatus.IN_PROGRESS)
    ).all()
    return {r for r in in_progress if _pin_queued_turn(session, r)}


def _lock_runs(session: Session, run_ids: Collection[uuid.UUID]) -> None:
    """The runs' rows locked in id order, in one statement: two passes (a scene's runs, then the
    others) each in order are not one order, and two transactions taking them so deadlocked."""
    if run_ids:
        session.execute(select(Run.id).where(Run.id.in_(list(run_ids))).order_by(Run.id).with_for_update())


def _pin_queued_turn(session: Session, run_id: uuid.UUID) -> bool:
    """Share-lock one sent queued turn of the run that nobody holds; False if there is none.

    The turns this transaction finished are finished in its own view, so the pin is always another.
    A row another transaction holds is skipped: it may be finishing that turn right now. Only queued
    turns: a claim skips a pinned one (and looks again shortly), while a running turn may be failed
    or requeued later in its owner's write transaction, which would then wait on this one as this
    one may wait on it (deadlock). Only sent ones (dispatched_at set): mark_dispatched skips a
    locked row, so a pinned unsent turn would stay unstamped and the sweeper would send it twice.
    The pin is the first queued turn at or after a random id between the run's lowest and highest
    queued ids, wrapping round, so writers pin different turns: heap order would give each the turn
    claims reach next, and a uuid4 pivot sorts above every time-ordered (uuidv7) id."""
    queued_ids = select(Turn.id).where(Turn.run_id == run_id, Turn.status == TurnStatus.QUEUED).limit(1)
    lowest, highest = session.execute(
        select(
            queued_ids.order_by(Turn.id).scalar_subquery(),
            queued_ids.order_by(Turn.id.desc()).scalar_subquery(),
        )
    ).one()
    if lowest is None:
        return False
    pivot = uuid.UUID(int=lowest.int + secrets.randbelow(highest.int - lowest.int + 1))
    # Row bounds on (run_id, status, id), not equalities: with run_id and status fixed, the planner
    # may walk the primary key in id order and filter (stale statistics on a run that is most of the
    # table made it read every row); only ix_turns_run_status_id returns this order unsorted.
    key = tuple_(Turn.run_id, Turn.status, Turn.id)
    queued = (run_id, TurnStatus.QUEUED.value)
    halves = (
        (key >= (*queued, pivot), key <= (*queued, _LAST_ID)),
        (key >= (*queued, _FIRST_ID), key < (*queued, pivot)),
    )
    arms = [
        select(Turn.id)
        .where(*bounds, Turn.dispatched_at.is_not(None))
        .order_by(Turn.run_id, Turn.status, Turn.id)
        .limit(1)
        .with_for_update(read=True, skip_locked=True)
        .cte(f"pin_{n}")
        for n, bounds in enumerate(halves)
    ]
    # FOR SHARE is refused in a UNION's arms, not in CTEs; the second runs only if the first is empty.
    return session.scalar(union_all(*(select(arm.c.id) for arm in arms)).limit(1)) is not None


def finalizing_runs(
    *, session: Session, limit: int = 10, models: Sequence[str] | None = None
) -> list[uuid.UUID]:
    """Runs in `finalizing` (of these models) nobody else is finalizing, locked until the caller's
    transaction ends."""
    query = select(Run.id).where(Run.status == RunStatus.FINALIZING)
    if models is not None:
        query = query.where(Run.model.in_(list(models)))
    return list(
        session.scalars(
            query.order_by(Run.finalizing_at)
            .limit(limit)
            .with_for_update(key_share=True, skip_locked=True)  # as finalize_run's
        ).all()
    )


def oldest_finalizing_since(*, session: Session) -> datetime | None:
    """When the run longest in `finalizing` entered it (None: none is): the files a finalizing writes
    are recorded only when it ends, and until then look like no one's."""
    return session.scalar(select(func.min(Run.finalizing_at)).where(Run.status == RunStatus.FINALIZING))


def finish_finalizing(
    *,
    session: Session,
    run_id: uuid.UUID,
    output_file_id: str | None,
    error_file_id: str | None,
    total_at_least: int = 0,
) -> RunStatus | None:
    """finish_finalizing: finalizing → completed (or cancelled / expired, as the run was ended), with
    its output and error files (None: no line to write), and its total raised to `total_at_least`
    (the requests its files account for, those it never stored among them); None if the run was not
    finalizing."""
    status = session.scalar(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.FINALIZING)
        .values(
            total=func.greatest(Run.total, total_at_least),
            status=case(
                (Run.cancel_reason == "expired", RunStatus.EXPIRED.value),
                (Run.cancel_reason == "cancelled", RunStatus.CANCELLED.value),
                else_=RunStatus.COMPLETED.value,
            ),
            output_file_id=output_file_id,
            error_file_id=error_file_id,
            # when the files are written (they may take minutes in this transaction), not when it began
            finished_at=func.clock_timestamp(),
        )
        .returning(Run.status)
    )
    return None if status is None else RunStatus(status)


def lock_run_of_output_file(*, session: Session, file_id: str) -> uuid.UUID | None:
    """The finished run whose output file this is, locked as a writer's text change locks it (FOR NO
    KEY UPDATE: rewrites of the file never interleave); None when there is none, or its deletion
    began."""
    return session.scalar(
        select(Run.id)
        .where(Run.output_file_id == file_id, Run.status.in_(RUN_FINISHED), Run.deleting_since.is_(None))
        .with_for_update(key_share=True)
    )


def begin_finalizing_try(*, session: Session, run_id: uuid.UUID) -> bool:
    """Record a finalizing try before its files are written, in a transaction of its own: the run goes
    to the back of the line and its give-up clock starts, as a failed try's would (review: a try
    killed mid-write recorded nothing, came first again at every pass, never reached the give-up,
    and left its files for good: the orphan sweep keeps what is newer than the oldest finalizing).
    False when it is not finalizing or another finalizer holds it (never waited for)."""
    free = (
        select(Run.id)
        .where(Run.id == run_id, Run.status == RunStatus.FINALIZING)
        .with_for_update(key_share=True, skip_locked=True)  # as finalize_run's own lock
        .scalar_subquery()
    )
    stamped = session.scalar(
        update(Run)
        .where(Run.id == free)
        .values(
            finalizing_at=func.now(),
            finalize_failed_since=func.coalesce(Run.finalize_failed_since, func.now()),
        )
        .returning(Run.id)
    )
    return stamped is not None


def postpone_finalizing(*, session: Session, run_id: uuid.UUID, error: str, give_up_s: float) -> bool:
    """A finalizing run whose files could not be written goes to the back of the line, saying why;
    one whose files have failed for `give_up_s` since its first try (begin_finalizing_try) fails instead
    (finalizing → failed, `server_error`: a fault that passes has had its time). Whether it failed."""
    since = func.coalesce(Run.finalize_failed_since, func.now())
    given_up = since < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, give_up_s)
    status = session.scalar(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.FINALIZING)
        .values(
            finalizing_at=func.now(),
            finalize_failed_since=since,
            status=case((given_up, RunStatus.FAILED.value), else_=Run.status),
            error=case((given_up, func.concat("gave up writing its files: ", error)), else_=error),
            error_code=case((given_up, "server_error"), else_=Run.error_code),
            finished_at=case((given_up, func.now()), else_=Run.finished_at),
        )
        .returning(Run.status)
    )
    return status is not None and RunStatus(status) == RunStatus.FAILED


def due_to_expire(
    *, session: Session, limit: int = 100, models: Sequence[str] | None = None
) -> list[uuid.UUID]:
    """Live runs (of these models) whose completion window has closed."""
    query = select(Run.id).where(Run.status.in_(RUN_LIVE), Run.expires_at < func.now())
    if models is not None:
        query = query.where(Run.model.in_(list(models)))
    return list(session.scalars(query.order_by(Run.expires_at).limit(limit)).all())


def advance_runs_of_turns(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> None:
    """advance the runs these turns belong to (after a transition finished them)."""
    if not turn_ids:
        return
    # Every run these turns may lock, in one pass in id order, before the scenes' hook locks its
    # runs and the advance the others: the runs of scenes whose steps they are (never pinned: their
    # queued turns may be the steps about to be created), and the others no pin shows going on.
    # (A transaction that advances twice, a group's store and then its failures, locks in two
    # passes still: again_on_conflict runs it again after a deadlock.)
    rows = session.execute(
        select(Turn.run_id, Scene.run_id)
        .outerjoin(Scene, Scene.id == Turn.scene_id)
        .where(Turn.id.in_(list(turn_ids)), or_(Turn.run_id.is_not(None), Scene.run_id.is_not(None)))
    ).all()
    runs = {run for run, _ in rows if run is not None}
    of_scenes = {run for _, run in rows if run is not None}
    pinned = _pin_runs(session, sorted(runs - of_scenes))
    locked = (runs | of_scenes) - pinned
    _lock_runs(session, locked)
    # A scene's next step is created first: the run never completes between two steps.
    locked |= set(advance_scenes_of_turns(session=session, turn_ids=turn_ids))
    advance_runs(session=session, run_ids=sorted(runs - pinned), locked=locked)


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel did: the status before and after, and how many queued turns it cancelled."""

    before: RunStatus
    after: RunStatus
    cancelled_turns: int

    @property
    def changed(self) -> bool:
        return self.before != self.after or self.cancelled_turns > 0


# What a turn of an expired run says (cancel_run; a claim: db/turns.py): one that never started, or
# one that had (its worker gone, or handed back) and was not answered.
EXPIRED_TURN = {
    "error": "the run's completion window closed before this turn started",
    "error_code": "expired",
}
EXPIRED_STARTED = "the run's completion window closed before this turn was answered"


# A cancelled turn's error is the cancel's, not an earlier attempt's (a batch that raised, an engine
# death: written on the turn as it went back to the queue), which the exports showed as its outcome.
CANCEL_CLEARS: dict[str, Any] = {"error": None, "error_code": None}


def expired_turn_error() -> Any:
    """The error an expired run's cancelled turn gets, as the turn stood (evaluated in the UPDATE)."""
    return case((Turn.started_at.is_(None), EXPIRED_TURN["error"]), else_=EXPIRED_STARTED)


def cancel_run(
    *, session: Session, run_id: uuid.UUID, reason: Literal["cancelled", "expired"] = "cancelled"
) -> CancelOutcome:
    """cancel: cancel the run's queued turns (and running ones whose lease lapsed), then validating |
    queued | in_progress → cancelling, then advance (→ cancelled at once when nothing is running). A
    run whose submission failed keeps its stored turns queued for a resume; cancelling it drops them
    the same way. Finished results are kept; a finished run is left as it is. `expired`: the run's
    completion window closed; its unstarted turns say so, and the run ends `expired`."""
    before = run_status(session=session, run_id=run_id)
    if before is None:
        raise KeyError(f"no run {run_id}")
    cancellable: tuple[RunStatus, ...] = (*RUN_LIVE, RunStatus.CANCELLING)
    if before == RunStatus.FAILED and _has_unfinished_turns(session, run_id):
        if session.scalar(select(Run.input_file_id.is_(None)).where(Run.id == run_id)):
            cancellable = (*cancellable, RunStatus.FAILED)  # a resumable run's failed submission
        else:  # a batch that failed stays failed; what it still holds stops (one failed before 0026)
            stopping = (Turn.run_id == run_id, claimable())  # a lapsed lease's too, as below
            dropped = session.execute(
                update(Turn)
                .where(*locked_in_id_order(session, *stopping))
                .values(
                    status=TurnStatus.CANCELLED, finished_at=func.now(), lease_until=None, **CANCEL_CLEARS
                )
            ).rowcount  # type: ignore[attr-defined]
            cancel_open_scenes(session=session, run_id=run_id, reason=f"the run was {reason}")
            return CancelOutcome(before, before, int(dropped))
    if before not in cancellable:
        return CancelOutcome(before, before, 0)
    if before == RunStatus.CANCELLING:  # what ended the run first names the turns cancelled later
        reason = session.scalar(select(Run.cancel_reason).where(Run.id == run_id)) or reason  # type: ignore[assignment]
    # Turns before the run: the lock order of every transaction that finishes turns. The turns a
    # claim could take: a running one whose lease lapsed (its worker gone) too, as a claim would
    # cancel it; with no worker of its model left to claim it, the run would stay cancelling for ever.
    why: dict[str, Any] = dict(CANCEL_CLEARS)
    if reason == "expired":  # a turn that started is not told it never did
        why = {"error": expired_turn_error(), "error_code": EXPIRED_TURN["error_code"]}
    cancelled = session.execute(
        update(Turn)
        .where(*locked_in_id_order(session, Turn.run_id == run_id, claimable()))
        .values(status=TurnStatus.CANCELLED, finished_at=func.now(), lease_until=None, **why)
    ).rowcount  # type: ignore[attr-defined]
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status.in_([s for s in cancellable if s != RunStatus.CANCELLING]))
        .values(status=RunStatus.CANCELLING, cancel_reason=reason, cancelling_at=func.now())
    )
    cancel_open_scenes(session=session, run_id=run_id, reason=f"the run was {reason}")
    advance_runs(session=session, run_ids=[run_id])
    after = run_status(session=session, run_id=run_id)
    assert after is not None
    return CancelOutcome(before, after, int(cancelled))


def _has_unfinished_turns(session: Session, run_id: uuid.UUID) -> bool:
    return bool(
        session.scalar(select(exists().where(Turn.run_id == run_id, Turn.status.in_(TURN_UNFINISHED))))
    )


# Reopened turns a turn of their conversation went past while they were failed (a later turn that
# is running or answered) move after it, from the first one overtaken on, in number order, and with
# them the conversation's later turns not yet started (they came after the retried line in input,
# and still do): nextval over the rows in number order. A claim waits only for the turns numbered
# before it, so in place the retry ran beside the running turn, neither prompt with the other's
# exchange (as revive_unsent and a scene's requeued step move theirs). The later turns are
# share-locked first, in a statement of their own: a claim of one that was under way is waited for
# and then read as it committed (one that starts after it still races the reopen, as any two claims
# of one conversation's turns do).
_LOCK_LATER_TURNS = text(
    """
SELECT l.id FROM turns l JOIN turns r ON r.conversation_id = l.conversation_id AND l.number > r.number
WHERE r.id = ANY(CAST(:ids AS uuid[])) AND l.id <> ALL(CAST(:ids AS uuid[]))
ORDER BY l.id FOR SHARE OF l
"""
)
_RENUMBER_OVERTAKEN = text(
    """
WITH reopened AS (
  SELECT id, conversation_id, number FROM turns WHERE id = ANY(CAST(:ids AS uuid[]))
), first_overtaken AS (
  SELECT r.conversation_id, min(r.number) AS from_number
  FROM reopened r
  WHERE EXISTS (
    SELECT 1 FROM turns l
    WHERE l.conversation_id = r.conversation_id AND l.number > r.number
      AND l.id <> ALL(CAST(:ids AS uuid[])) AND l.status IN ('running', 'done')
  )
  GROUP BY r.conversation_id
), moved AS (
  SELECT id, nextval(pg_get_serial_sequence('turns', 'number')) AS number
  FROM (
    SELECT t.id FROM turns t JOIN first_overtaken f USING (conversation_id)
    WHERE t.number >= f.from_number AND (t.id = ANY(CAST(:ids AS uuid[])) OR t.status = 'queued')
    ORDER BY t.number
  ) in_order
)
UPDATE turns SET number = moved.number FROM moved WHERE turns.id = moved.id
"""
)


def reopen_failed(*, session: Session, run_id: uuid.UUID) -> list[uuid.UUID]:
    """reopen: a finished (or still running) run's failed turns go back to queued with fresh attempts,
    and the run to in_progress; returns their ids. NotRetryable for runs in other states."""
    status = run_status(session=session, run_id=run_id)
    if status not in (RunStatus.COMPLETED, RunStatus.IN_PROGRESS):
        raise NotRetryable(
            f"run is {status}: only a completed or in-progress run's failed turns can be retried"
        )
    batch, deleting = session.execute(
        select(Run.input_file_id.is_not(None), Run.deleting_since.is_not(None)).where(Run.id == run_id)
    ).one()
    if deleting:  # half deleted: reopened, it would finish short (review)
        raise NotRetryable("run is being deleted: it ended longer ago than MLCHAT_RUN_RETENTION_DAYS")
    if status == RunStatus.COMPLETED and batch:
        # its output and error files are written and called back: a batch is not reopened
        raise NotRetryable("run is a completed batch: submit its failed requests as a new batch")
    ids = list(
        session.scalars(
            update(Turn)
            .where(*locked_in_id_order(session, Turn.run_id == run_id, Turn.status == TurnStatus.FAILED))
            .values(  # a fresh start: what counted toward its failure counts no more
                params=retried_params(),  # SET reads the row as it was: its error_code too
                status=TurnStatus.QUEUED,
                attempts=0,
                outage_refunds=0,
                # one death at most kept: a turn that killed engines runs alone first, then gets one more
                engine_deaths=func.least(Turn.engine_deaths, 1),
                deferred_since=None,
                deferrals=0,
                error=None,
                error_code=None,
                timings=None,  # the failed attempt's stages, shown on the queued turn till answered (review)
                finished_at=None,
                claim_token=None,
                queued_at=func.now(),
                dispatched_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )
    if ids:
        session.execute(_LOCK_LATER_TURNS, {"ids": ids})
        session.execute(_RENUMBER_OVERTAKEN, {"ids": ids})
        moved = session.scalar(
            update(Run)
            # A batch as read above: one finalized meanwhile (files written, callback queued) is
            # not reopened to write a second set (review, stop 75); a run, either state.
            .where(
                Run.id == run_id,
                Run.status == status
                if batch
                else Run.status.in_((RunStatus.COMPLETED, RunStatus.IN_PROGRESS)),
                Run.deleting_since.is_(None),  # its deletion's first chunk committed meanwhile
            )
            .values(status=RunStatus.IN_PROGRESS, finished_at=None)
            .returning(Run.id)
        )
        if moved is None:
            raise ValueError("the run changed state meanwhile; try again")
        reopen_failed_scenes(session=session, turn_ids=ids)  # a retried step goes on with its scene
    return ids


def find_run(*, session: Session, ref: str) -> Run | None:
    """A run by id or by name (a name that reads as an id, a file's content hash say, too). A name
    is found in whichever Unicode form it was stored: a run named after a file keeps that file's
    name as written, decomposed on macOS ("서울.jsonl" in NFD), while a name typed is composed
    (review, stop 75: `mlchat run status 서울` found no run)."""
    try:
        found = session.get(Run, uuid.UUID(ref))
    except ValueError:
        found = None
    if found is not None:
        return found
    forms = list(dict.fromkeys([ref, unicodedata.normalize("NFC", ref), unicodedata.normalize("NFD", ref)]))
    named = session.scalars(select(Run).where(Run.name.in_(forms))).all()
    return next((run for form in forms for run in named if run.name == form), None)  # as written first


def later_scene_steps(*, session: Session, run_id: uuid.UUID) -> int:
    """The run's turns that are a scene's steps past its first: each made by the step before it, not
    a line of the run's file (a line's count is its turns less these; review: a scene run's lines
    "never stored" were hidden by its steps)."""
    if not session.scalar(select(exists().where(Scene.run_id == run_id))):
        return 0
    return int(session.scalar(select(func.count()).where(Turn.run_id == run_id, Turn.scene_step > 1)) or 0)


def run_counts(*, session: Session, run_id: uuid.UUID, unsent: bool = True) -> RunCounts:
    """Count the run's turns by status in one query (see runs_counts for `unsent`)."""
    return runs_counts(session=session, run_ids=[run_id], unsent=unsent)[run_id]


def runs_counts(
    *, session: Session, run_ids: Sequence[uuid.UUID], unsent: bool = True
) -> dict[uuid.UUID, RunCounts]:
    """Count each run's turns by status: two queries for a page of runs, not two a run. Without
    `unsent` (its count is then 0), the counts are read from the index of turns by run and status
    alone: whether each was sent is in the row, and reading every row of a million-line batch at
    each poll of it costs seconds."""
    n: dict[uuid.UUID, dict[TurnStatus, int]] = {r: dict.fromkeys(TurnStatus, 0) for r in run_ids}
    not_sent = dict.fromkeys(run_ids, 0)
    rows = session.execute(
        select(Turn.run_id, Turn.status, func.count())
        .where(Turn.run_id.in_(list(run_ids)))
        .group_by(Turn.run_id, Turn.status)
    ).all()
    for run_id, status, count in rows:
        assert run_id is not None  # the query's filter
        n[run_id][TurnStatus(status)] = int(count)
    if unsent:  # queued turns only: what the index holds narrows the rows read to those
        for run_id, count in session.execute(
            select(Turn.run_id, func.count())
            .where(
                Turn.run_id.in_(list(run_ids)), Turn.status == TurnStatus.QUEUED, Turn.dispatched_at.is_(None)
            )
            .group_by(Turn.run_id)
        ).tuples():
            assert run_id is not None  # the query's filter
            not_sent[run_id] = int(count)
    refused: dict[uuid.UUID, int] = dict(
        session.execute(
            select(Run.id, func.coalesce(func.jsonb_array_length(Run.refused), 0)).where(
                Run.id.in_(list(run_ids))
            )
        ).all()
    )
    return {
        r: RunCounts(
            total=sum(n[r].values()),
            queued=n[r][TurnStatus.QUEUED],
            running=n[r][TurnStatus.RUNNING],
            completed=n[r][TurnStatus.DONE],
            failed=n[r][TurnStatus.FAILED],
            cancelled=n[r][TurnStatus.CANCELLED],
            unsent=not_sent[r],
            refused=int(refused.get(r) or 0),
        )
        for r in run_ids
    }


def unsent_turns(
    *, session: Session, run_id: uuid.UUID, limit: int, after: int = 0
) -> list[tuple[uuid.UUID, int]]:
    """The run's queued turns no message was sent for yet, in input order, after the turn numbered
    `after`: (id, number). A caller paging on from the last number reads each turn once (read from
    the run's first turn each time, a batch of a million lines read each sent one again per page)."""
    return list(
        session.execute(
            select(Turn.id, Turn.number)
            .where(
                Turn.run_id == run_id,
                Turn.number > after,
                Turn.status == TurnStatus.QUEUED,
                Turn.dispatched_at.is_(None),
            )
            .order_by(Turn.number)
            .limit(limit)
        ).tuples()
    )


def run_quality(*, session: Session, run_id: uuid.UUID) -> dict[str, Any]:
    """Reply-quality summary of a run's answered turns (roleplay/quality.py)."""
    q = Turn.quality
    # A data reply (json_schema, json_object, regex, choice) is scored but is no line of the
    # character: its scores stay out of the means (review: JSON keys read as another language, a
    # run of Korean players' structured replies showed a language match near 0).
    line = func.coalesce(Turn.params["response_format"]["type"].as_string().not_in(DATA_REPLIES), true())
    row = session.execute(
        select(
            func.count(q),
            func.avg(q["persona"].as_float()).filter(line),
            func.avg(q["repetition"].as_float()).filter(line),
            func.avg(case((q["language_match"].as_boolean(), 1.0), else_=0.0)).filter(line),
            func.count().filter(func.jsonb_array_length(q["below_bar"]) > 0),
            func.count().filter(q.has_key("regenerated")),
            # Scored replies only: an unscored one's quality is SQL NULL or JSON null (None in a JSON column).
        ).where(Turn.run_id == run_id, func.jsonb_typeof(q) == "object")
    ).one()
    scored, persona, repetition, language, below, regenerated = row
    if not scored:
        return {"scored": 0}
    return {
        "scored": scored,
        # None where no scored reply has that score (data replies carry no persona or repetition).
        "persona_mean": _mean(persona),
        "repetition_mean": _mean(repetition),
        "language_match_rate": _mean(language),
        "below_bar": below,
        "below_bar_reasons": below_bar_reasons(session=session, run_id=run_id),
        "regenerated": regenerated,
    }


def _mean(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def below_bar_reasons(*, session: Session, run_id: uuid.UUID) -> dict[str, int]:
    """How many of the run's kept replies each check of the quality gate put below the bar."""
    reason = func.jsonb_array_elements_text(Turn.quality["below_bar"]).table_valued("value").render_derived()
    kind = func.split_part(reason.c.value, ":", 1)
    rows = session.execute(
        select(kind, func.count())
        .select_from(Turn)
        .join(reason, true())
        .where(Turn.run_id == run_id, Turn.status == TurnStatus.DONE)
        .group_by(kind)
        .order_by(func.count().desc())
    ).all()
    return {str(k): int(n) for k, n in rows}


def list_runs(*, session: Session, limit: int = 50) -> Sequence[Run]:
    """Newest runs first."""
    return session.scalars(select(Run).order_by(Run.created_at.desc()).limit(limit)).all()


def run_refusals(*, session: Session, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """The run's well-formed requests refused by policy at submission: [{line, custom_id, message,
    param}]."""
    return list(session.scalar(select(Run.refused).where(Run.id == run_id)) or [])


def run_custom_ids(*, session: Session, run_id: uuid.UUID) -> set[str]:
    """The custom ids of the run's stored turns."""
    return set(
        session.scalars(select(Turn.custom_id).where(Turn.run_id == run_id, Turn.custom_id.is_not(None)))
    )


def iter_run_turns(*, session: Session | None, run_id: uuid.UUID, chunk: int = 1000) -> Iterator[Turn]:
    """The run's turns in number order (input order, but for a line retried after a later line of
    its conversation went past it, which reopen_failed moved after it), streamed in chunks (bounded
    memory for large runs), without
    their prompt and retrieved context: an export never writes them, and they are most of a turn's
    bytes (tens of kilobytes each, stored out of line: a million-line batch's tens of gigabytes).
    `session` None: each chunk is read in a transaction of its own, so an export that takes minutes
    holds none open meanwhile (a migration's lock would wait for it); then a retry-failed between two
    chunks may move a line already read past the cursor: a failed one is yielded once, as first read;
    a queued one moved with it is yielded again (an export writes it only once it is answered)."""
    last = -1
    seen: set[uuid.UUID] = set()
    unread = defer(Turn.prompt, raiseload=True), defer(Turn.context, raiseload=True)
    while True:
        with given_or_own(session) as reading:
            rows = reading.scalars(
                select(Turn)
                .where(Turn.run_id == run_id, Turn.number > last)
                .order_by(Turn.number)
                .limit(chunk)
                .options(*unread)
            ).all()
            reading.expunge_all()
        if not rows:
            return
        for turn in rows:
            if turn.id in seen:
                continue
            # Only a line a retry can move and an export writes is remembered (a failed one: a queued
            # one writes nothing, and read again once answered it is written then): the set stays
            # as small as those, not the run.
            if session is None and turn.status == TurnStatus.FAILED:
                seen.add(turn.id)
            yield turn
        last = rows[-1].number


@contextmanager
def submission_lock(name: str, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the run name's submission lock on a connection of its own; yields False if another
    process holds it (a submission of that run is going on, or housekeeping is closing the run) for
    `wait_s` more seconds."""
    with advisory_lock(_LOCK_NAMESPACE, name_key(name), wait_s=wait_s) as holder:
        yield holder is not None


def submission_alive(*, session: Session, name: str) -> bool:
    """Whether some process holds the run's submission lock right now (read only)."""
    return held_by(session=session, namespace=_LOCK_NAMESPACE, key=name_key(name))


def _stored_or_sent_since(cutoff: Any) -> Any:
    """A run's turn stored or sent after `cutoff` (its submitter storing on; a worker's re-send too).
    Not a scene's later step, which a worker's store makes and sends: a dead submitter's scene run
    stayed `validating` for as long as its stored scenes went on stepping (scenes review)."""
    return exists().where(
        Turn.run_id == Run.id,
        or_(Turn.scene_step.is_(None), Turn.scene_step <= 1),
        or_(Turn.created_at > cutoff, Turn.dispatched_at > cutoff),
    )


def submission_went_on(*, session: Session, run_id: uuid.UUID, within_s: float) -> bool:
    """Whether a turn of the run was stored or sent within `within_s`: read again by the sweeper under
    the run's lock, before it fails the run (a chunk stored since its look)."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, within_s)
    return bool(session.scalar(select(_stored_or_sent_since(cutoff)).where(Run.id == run_id)))


def abandoned_submissions(*, session: Session, older_than_s: float) -> list[Run]:
    """Runs other than batches left in `validating` longer than `older_than_s` with no live
    submitter (read only): none of their turns stored or sent within that time either (review: a
    submitter whose lock's idle connection a pooler or `idle_session_timeout` closed went on storing,
    and had its run failed under it as interrupted). A batch's submission is retried instead:
    batch_submissions_due."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    runs = session.scalars(
        select(Run).where(
            Run.status == RunStatus.VALIDATING,
            Run.created_at < cutoff,
            Run.input_file_id.is_(None),
            ~_stored_or_sent_since(cutoff),
        )
    ).all()
    return [run for run in runs if not submission_alive(session=session, name=run.name)]
