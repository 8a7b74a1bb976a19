"""What the deployment keeps for a limited time (MLCHAT_RUN_RETENTION_DAYS,
MLCHAT_PROMPT_RETENTION_DAYS, MLCHAT_REQUEST_COPY_RETENTION_DAYS; 0 keeps it for good): an ended
run's rows, a finished live turn's rendered prompt, context manifest and unpicked candidates, and
the conversations made for one request. Each statement does a bounded chunk, so
a sweep deletes a million-line run over many short transactions, never one that holds its tables."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, delete, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from core.settings import settings
from db.callbacks import GIVEN_UP, LOST_WINDOW_FLOOR_S
from db.erasure import LOCK_TIMEOUT_MS
from db.files import delete_file
from db.models import RUN_FINISHED, TURN_UNFINISHED, Run, RunStatus, StoredFile, Turn, TurnReview, TurnStatus

CHUNK = 2000


def _ago(days: int) -> Any:
    """now() less `days` days, as the database counts them."""
    return text("now() - make_interval(days => :days)").bindparams(days=days)


def _deletable(days: int | None) -> Any:
    """A run to delete whole: one whose deletion began (deleting_since: nothing changes it any more),
    or one past `days` (_past). `days` None: the first alone (retention switched off since: what was
    begun is finished)."""
    marked = Run.deleting_since.is_not(None)
    return marked if days is None else or_(marked, _past(days))


def _past(days: int) -> Any:
    """Ended more than `days` ago, nothing of it still to answer (a failed CLI run's sent lines may
    still be answered; its lines never sent, nothing will send), no callback still owed (due again,
    or never tried while the sweeps may still queue it: its broker was away), and no writer's review
    of a line (its verdicts keep a rejected line out of LoRA training data: db/training.py)."""
    cutoff = _ago(days)
    reviewed = (
        select(TurnReview.turn_id).join(Turn, Turn.id == TurnReview.turn_id).where(Turn.run_id == Run.id)
    )
    unanswered = exists().where(
        Turn.run_id == Run.id,
        Turn.status.in_(TURN_UNFINISHED),
        or_(
            Turn.status != TurnStatus.QUEUED, Turn.dispatched_at.is_not(None), Run.status != RunStatus.FAILED
        ),
    )
    # as long as the sweeps still queue a lost one (db/callbacks.py::claim_lost_callbacks), a day more
    # for the sweep's own `--older-than`
    lost_window_s = max(settings.callback_retry_window_s, LOST_WINDOW_FLOOR_S) + 86400
    callback_owed = and_(
        Run.callback_url.is_not(None),
        Run.callback_delivered_at.is_(None),
        Run.callback_attempts == 0,
        func.coalesce(func.strpos(Run.callback_error, GIVEN_UP), 0) == 0,
        Run.finished_at >= func.now() - func.make_interval(0, 0, 0, 0, 0, 0, lost_window_s),
    )
    return and_(
        Run.created_at < cutoff,  # read from the index by creation time: a run ends after it is created
        Run.status.in_(RUN_FINISHED),
        Run.finished_at < cutoff,
        Run.callback_retry_at.is_(None),
        ~callback_owed,
        ~unanswered,
        ~exists(reviewed),
    )


def runs_past(*, session: Session, days: int | None, limit: int) -> list[uuid.UUID]:
    """Runs to delete whole (_deletable): those whose deletion began first (their partial index,
    migration 0050), then the oldest past `days`."""
    marked = list(
        session.scalars(
            select(Run.id).where(Run.deleting_since.is_not(None)).order_by(Run.deleting_since).limit(limit)
        )
    )
    if days is None or len(marked) >= limit:
        return marked
    return marked + list(
        session.scalars(
            select(Run.id)
            .where(Run.deleting_since.is_(None), _past(days))
            .order_by(Run.created_at, Run.id)
            .limit(limit - len(marked))
        )
    )


def _held(session: Session, run_id: uuid.UUID, days: int | None) -> str | None:
    """The run's name, its row locked for this transaction and marked as being deleted (from its
    first chunk on, the desk, a retry and an export refuse it: half deleted, it is no whole run),
    while it is still one to delete; None once it is not (a retry reopened it before its first
    chunk). Each lock waits at most LOCK_TIMEOUT_MS, then raises LockNotAvailable: this takes the run
    before its turns, which a store or a retry take the other way round, so in any cycle of waits the
    deletion is the one that gives way."""
    session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
    name = session.scalar(select(Run.name).where(Run.id == run_id, _deletable(days)).with_for_update(of=Run))
    # Checked again in a statement of its own, on a snapshot taken once the lock is held: the one
    # above read the run's lines as they were when it started, and a writer's verdict committed while
    # it waited for the run (the desk locks it, never updates it) went unseen (review).
    if name is not None and not session.scalar(select(exists().where(Run.id == run_id, _deletable(days)))):
        return None
    if name is not None:
        session.execute(
            update(Run)
            .where(Run.id == run_id, Run.deleting_since.is_(None))
            .values(deleting_since=func.now())
        )
    return name


# The conversations the run made for its lines, by their exact names (services/runs/line_keys.py:
# `run:<name>:<custom_id>` of the line, or of its scene for a scene's steps, or that name's sha256
# when longer than 200 characters), that no turn of anything else is in. A conversation a line named
# (a game's own, whatever its name) is not one of them. Locked first, then checked again in a
# statement of its own: an enqueue into one (which key-share-locks it) commits before it is read.
_RUN_CONVERSATIONS = text(
    """
SELECT c.id FROM turns t
  LEFT JOIN scenes s ON s.id = t.scene_id
  CROSS JOIN LATERAL (SELECT 'run:' || :name || ':' || coalesce(s.custom_id, t.custom_id) AS k) n
  JOIN conversations c ON c.id = t.conversation_id
WHERE t.run_id = :run
  AND c.external_id = CASE WHEN char_length(n.k) <= 200 THEN n.k
                           ELSE 'sha256:' || encode(sha256(convert_to(n.k, 'UTF8')), 'hex') END
  AND NOT EXISTS (SELECT 1 FROM turns o WHERE o.conversation_id = c.id AND o.run_id IS DISTINCT FROM :run)
LIMIT :chunk
FOR UPDATE OF c
"""
)
_DELETE_IF_ONLY_THE_RUNS = text(
    """
DELETE FROM conversations c WHERE c.id = ANY(:ids)
  AND NOT EXISTS (SELECT 1 FROM turns o WHERE o.conversation_id = c.id AND o.run_id IS DISTINCT FROM :run)
"""
)
_DELETE_RUN_TURNS = text(
    "DELETE FROM turns WHERE id IN (SELECT id FROM turns WHERE run_id = :run LIMIT :chunk)"
)


@dataclass(frozen=True)
class RunChunk:
    """What one chunk of a run's deletion did: rows deleted in its phase (0: the phase is done), and
    once the run's own row went, the paths of the files it wrote, under the files folder (the caller
    deletes their bytes once this commits; its input file is left to its own expiry: another batch
    may read it)."""

    deleted: int
    files: tuple[str, ...] = ()


Phase = Literal["conversations", "turns", "run"]  # a run's deletion, in this order
PHASES: tuple[Phase, ...] = ("conversations", "turns", "run")


def delete_run_chunk(
    *, session: Session, run_id: uuid.UUID, days: int | None, phase: Phase
) -> RunChunk | None:
    """delete: a chunk of an ended run past `days`, in phases: "conversations" (its own, with their
    lines, vectors, scenes and its turns in them), "turns" (its turns in conversations it does not
    own), "run" (its row, and its output and error files' rows). None when the run is no longer one
    to delete. LockNotAvailable when a lock is held past LOCK_TIMEOUT_MS (try again later)."""
    name = _held(session, run_id, days)
    if name is None:
        return None
    if phase == "conversations":
        ids = list(
            dict.fromkeys(session.scalars(_RUN_CONVERSATIONS, {"run": run_id, "name": name, "chunk": CHUNK}))
        )
        if not ids:
            return RunChunk(0)
        # Each locked one that another turn entered meanwhile is kept, and not found again.
        session.execute(_DELETE_IF_ONLY_THE_RUNS, {"ids": ids, "run": run_id})
        return RunChunk(len(ids))
    if phase == "turns":
        return RunChunk(int(session.execute(_DELETE_RUN_TURNS, {"run": run_id, "chunk": CHUNK}).rowcount))  # type: ignore[attr-defined]
    assert phase == "run", phase  # never the run's row for a phase misnamed
    files = session.execute(
        delete(Run).where(Run.id == run_id).returning(Run.output_file_id, Run.error_file_id)
    ).one()
    # A file whose expiry its batch advertised (`output_expires_after`) is still ahead is left to it:
    # downloadable until then, as its object says (review: retention deleted it before).
    expiring_later = set(
        session.scalars(
            select(StoredFile.id).where(
                StoredFile.id.in_([f for f in files if f]), StoredFile.expires_at > func.now()
            )
        )
    )
    gone = [
        row.path
        for file_id in files
        if file_id
        and file_id not in expiring_later
        and (row := delete_file(session=session, file_id=file_id))
    ]
    return RunChunk(1, tuple(gone))


def forget_prompts(*, session: Session, days: int) -> int:
    """forget: a chunk of live turns finished more than `days` ago lose their rendered prompt, context
    manifest and unpicked candidates (the reply, its line, usage, scores and timings stay); how many."""
    cutoff = _ago(days)
    kept = (
        select(Turn.id)
        .where(Turn.run_id.is_(None), Turn.prompt.is_not(None), Turn.finished_at < cutoff)
        .order_by(Turn.finished_at)  # the index's order (migration 0049): the oldest, none read twice
        .limit(CHUNK)
        .with_for_update(skip_locked=True)
    )
    return int(
        session.execute(
            update(Turn)
            .where(Turn.id.in_(kept.scalar_subquery()))
            .values(prompt=None, context=None, alternatives=None)
        ).rowcount  # type: ignore[attr-defined]
    )


# A conversation made for one request, never continued (its one turn, at most): the copy of its
# history an original-shape request naming none is answered in (services/characters.py INLINE_COPY;
# the `inline-` prefix is refused for a client's conversation there). Not the history it was copied
# from (`inline-<32 hex>`: another request of that history may be copying it now), and not a chat
# completion's that named none (`chat-<uuid>`): that name is no reserved one, and a game's own
# conversation of one turn under it would go too. The pattern is written out so that the index of
# migration 0049, whose predicate it is, serves the statement (test_retention.py checks it is
# services/characters.py's INLINE_COPY).
_DELETE_REQUEST_COPIES = text(
    """
DELETE FROM conversations WHERE id IN (
  SELECT c.id FROM conversations c
  WHERE c.external_id ~ '^inline-[0-9a-f]{32}-[0-9a-f]{12}$'
    AND c.created_at < now() - make_interval(days => :days)
    AND (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) <= 1
    AND NOT EXISTS (
      SELECT 1 FROM turns t WHERE t.conversation_id = c.id
        AND (t.finished_at IS NULL OR t.finished_at >= now() - make_interval(days => :days))
    )
  ORDER BY c.created_at
  LIMIT :chunk
  FOR UPDATE OF c SKIP LOCKED
)
"""
)


def delete_request_copies(*, session: Session, days: int) -> int:
    """delete: a chunk of conversations made for one request, made more than `days` ago, whose turn
    (if any) finished that long ago; how many."""
    return int(session.execute(_DELETE_REQUEST_COPIES, {"days": days, "chunk": CHUNK}).rowcount)  # type: ignore[attr-defined]
