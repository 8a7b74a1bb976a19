"""The turn state machine, and every query on turns. Each transition is one conditional UPDATE:

    create                      → queued
    claim     queued, or running with an expired lease → running (new token and lease, attempts + 1)
    exhaust   claimable with no attempts left          → failed (attempts_exhausted)
    renew     running under our token                  → lease extended
    complete  running under our token                  → done (the reply stored once)
    fail      running under our token                  → failed
    requeue   running under our token                  → queued (the attempt kept, or refunded)
    cancel    queued                                   → cancelled
    fail_unsent / revive_unsent: queued ↔ failed(broker_unreachable), for turns never sent

A worker that lost its lease (it ran past lease_until and another worker claimed the turn) changes
nothing: every write after the claim names the claim token. A transition that finishes turns of a
bulk run advances that run in the same transaction (db/runs.py), so a run's status never lags its
turns and is never written from a read path.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from db.models import (
    Character,
    Conversation,
    Message,
    Role,
    Turn,
    TurnErrorCode,
    TurnStatus,
)
from db.runs import advance_runs_of_turns

ERROR_CHARS = 2000


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different request."""


@dataclass(frozen=True)
class NewTurn:
    """A validated turn ready to insert."""

    idempotency_key: str
    request_hash: str
    conversation_id: int
    message: str
    model: str
    params: dict[str, Any]
    run_id: uuid.UUID | None = None
    custom_id: str | None = None
    speaker: str = "character"
    api_key: str | None = None
    callback_url: str | None = None


@dataclass(frozen=True)
class StoredTurn:
    """What create_turns did with one request: a new turn, or the turn its idempotency key names."""

    id: uuid.UUID
    created: bool
    status: TurnStatus
    model: str
    error_code: str | None = None


@dataclass(frozen=True)
class ClaimedTurn:
    """Everything the pipeline needs about one turn, read in the claim's single query."""

    id: uuid.UUID
    conversation_id: int
    message: str
    params: dict[str, Any]
    attempts: int
    character: Character
    player_name: str
    story: str | None
    story_time: int | None
    queued_ms: float
    speaker: str = "character"
    emotion: str = "neutral"
    affinity: int = 0
    run_id: uuid.UUID | None = None


@dataclass
class ClaimResult:
    """The claim's outcome for each turn id of a batch."""

    token: uuid.UUID
    claimed: list[ClaimedTurn] = field(default_factory=list)
    # An earlier turn of its conversation is unfinished.
    deferred: list[uuid.UUID] = field(default_factory=list)
    # Running under another worker's live lease (a duplicate message): {turn id: seconds the lease has left}.
    held: dict[uuid.UUID, float] = field(default_factory=dict)
    skipped: list[uuid.UUID] = field(default_factory=list)  # done, failed, cancelled or unknown
    exhausted: list[uuid.UUID] = field(default_factory=list)  # failed now: no attempts left


def _seconds(value: float) -> Any:
    return func.make_interval(0, 0, 0, 0, 0, 0, value)


def _lease_live() -> Any:
    return and_(Turn.lease_until.is_not(None), Turn.lease_until > func.now())


def _claimable() -> Any:
    return or_(Turn.status == TurnStatus.QUEUED, and_(Turn.status == TurnStatus.RUNNING, ~_lease_live()))


def _ours(token: uuid.UUID) -> Any:
    return and_(Turn.status == TurnStatus.RUNNING, Turn.claim_token == token)


def _by_id(values: dict[uuid.UUID, Any]) -> Any:
    """A per-row value in one UPDATE (CASE on the turn id)."""
    return case({turn_id: value for turn_id, value in values.items()}, value=Turn.id)


def create_turns(*, session: Session, turns: Sequence[NewTurn]) -> list[StoredTurn]:
    """Insert turns, deduplicating on idempotency key; one StoredTurn per request, in input order.

    Two requests of one call with the same key are one turn (created once, sent once) when they ask
    the same thing, and an IdempotencyConflict naming both items when they do not. New turns are
    stamped dispatched now: the caller sends them right after the commit.
    """
    if not turns:
        return []
    first: dict[str, int] = {}
    for i, t in enumerate(turns):
        j = first.setdefault(t.idempotency_key, i)
        if turns[j].request_hash != t.request_hash:
            raise IdempotencyConflict(
                f"items {j} and {i} use idempotency key {t.idempotency_key!r} for different requests"
            )
    unique = [turns[i] for i in first.values()]
    now = datetime.now(UTC)
    rows = [dict(id=uuid.uuid4(), dispatched_at=now, **t.__dict__) for t in unique]
    stmt = (
        insert(Turn)
        .on_conflict_do_nothing(index_elements=[Turn.idempotency_key])
        .returning(Turn.idempotency_key, Turn.id)
    )
    created: dict[str, uuid.UUID] = dict(session.execute(stmt, rows).tuples().all())
    repeated = [t.idempotency_key for t in unique if t.idempotency_key not in created]
    known = {
        key: (request_hash, turn_id, status, model, code)
        for key, request_hash, turn_id, status, model, code in session.execute(
            select(
                Turn.idempotency_key, Turn.request_hash, Turn.id, Turn.status, Turn.model, Turn.error_code
            ).where(Turn.idempotency_key.in_(repeated))
        ).tuples()
    }
    out: list[StoredTurn] = []
    for i, t in enumerate(turns):
        key = t.idempotency_key
        if key in created:
            out.append(StoredTurn(created[key], first[key] == i, TurnStatus.QUEUED, t.model))
            continue
        request_hash, turn_id, status, model, code = known[key]
        if request_hash != t.request_hash:
            raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different request")
        out.append(StoredTurn(turn_id, False, TurnStatus(status), model, code))
    return out


def claim_turns(
    *,
    session: Session,
    turn_ids: Sequence[uuid.UUID],
    lease_s: float,
    max_attempts: int,
    token: uuid.UUID | None = None,
) -> ClaimResult:
    """Take the batch's claimable turns under one claim token and a lease of `lease_s` seconds.

    Claimable: queued, or running under a lease that has expired (its worker is presumed gone). A
    turn running under a live lease is another worker's: it is reported `held`, never generated
    twice. A claimable turn that has used up `max_attempts` is failed here instead (the dead-letter
    state), so a message that keeps coming back, because its batch keeps dying, cannot loop forever.
    A turn is deferred while an earlier turn of its conversation is queued or running under a live
    lease, so a conversation's turns are answered in order and each sees the previous reply.
    """
    result = ClaimResult(token=token or uuid.uuid4())
    earlier = aliased(Turn)
    blocked = exists().where(
        earlier.conversation_id == Turn.conversation_id,
        earlier.number < Turn.number,
        or_(
            earlier.status == TurnStatus.QUEUED,
            and_(earlier.status == TurnStatus.RUNNING, earlier.lease_until > func.now()),
        ),
    )
    # Row locks in one order, skipping rows another claim or write holds right now: two workers
    # with the same turn ids (a duplicate message) never wait on each other or deadlock.
    candidates = list(
        session.scalars(
            select(Turn.id)
            .where(Turn.id.in_(list(turn_ids)), _claimable())
            .order_by(Turn.id)
            .with_for_update(skip_locked=True)
        ).all()
    )
    result.exhausted = (
        list(
            session.scalars(
                update(Turn)
                .where(Turn.id.in_(candidates), Turn.attempts >= max_attempts)
                .values(
                    status=TurnStatus.FAILED,
                    error_code=TurnErrorCode.ATTEMPTS_EXHAUSTED.value,
                    error=func.concat(
                        f"gave up after {max_attempts} attempts; last error: ",
                        func.coalesce(Turn.error, "the batch died"),
                    ),
                    finished_at=func.now(),
                    lease_until=None,
                )
                .returning(Turn.id)
            ).all()
        )
        if candidates
        else []
    )
    fresh = [i for i in candidates if i not in set(result.exhausted)]
    claimed_ids = (
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(fresh), ~blocked)
            .values(
                status=TurnStatus.RUNNING,
                attempts=Turn.attempts + 1,
                started_at=func.now(),
                claim_token=result.token,
                lease_until=func.now() + _seconds(lease_s),
            )
            .returning(Turn.id)
        ).all()
        if fresh
        else []
    )
    if claimed_ids:
        rows = session.execute(
            select(Turn, Conversation, Character, func.extract("epoch", func.now() - Turn.created_at))
            .join(Conversation, Conversation.id == Turn.conversation_id)
            .join(Character, Character.id == Conversation.character_id)
            .where(Turn.id.in_(claimed_ids))
            .order_by(Turn.number)
        ).all()
        for turn, conv, char, waited_s in rows:
            result.claimed.append(
                ClaimedTurn(
                    id=turn.id,
                    conversation_id=conv.id,
                    message=turn.message,
                    params=turn.params,
                    attempts=turn.attempts,
                    character=char,
                    player_name=conv.player_name,
                    story=conv.story,
                    story_time=conv.story_time,
                    queued_ms=float(waited_s) * 1000.0,
                    speaker=turn.speaker,
                    emotion=conv.emotion,
                    affinity=conv.affinity,
                    run_id=turn.run_id,
                )
            )
    if result.exhausted:
        advance_runs_of_turns(session=session, turn_ids=result.exhausted)
    taken = set(claimed_ids) | set(result.exhausted)
    unclaimed = [i for i in turn_ids if i not in taken]
    if unclaimed:
        open_now = {
            turn_id: (status, lease_left)
            for turn_id, status, lease_left in session.execute(
                select(
                    Turn.id,
                    Turn.status,
                    func.extract("epoch", Turn.lease_until - func.now()),
                ).where(Turn.id.in_(unclaimed), Turn.status.in_((TurnStatus.QUEUED, TurnStatus.RUNNING)))
            ).tuples()
        }
        for turn_id in unclaimed:
            if turn_id not in open_now:
                result.skipped.append(turn_id)
                continue
            status, lease_left = open_now[turn_id]
            if status == TurnStatus.RUNNING and lease_left is not None and lease_left > 0:
                result.held[turn_id] = float(lease_left)
            else:
                result.deferred.append(turn_id)
    return result


def renew_lease(*, session: Session, token: uuid.UUID, lease_s: float) -> int:
    """Extend the lease of every turn still running under this claim; returns how many."""
    result = session.execute(
        update(Turn).where(_ours(token)).values(lease_until=func.now() + _seconds(lease_s))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TurnOutcome:
    """A generated reply to store, with everything the turn row records about it."""

    turn_id: uuid.UUID
    conversation_id: int
    user_message: str
    user_embedding: Any
    reply: str
    reply_embedding: Any
    prompt: str
    context: dict[str, Any]
    usage: dict[str, Any]
    timings: dict[str, Any]
    params: dict[str, Any]
    reply_role: Role = Role.ASSISTANT  # NARRATOR for a narrator turn
    state: dict[str, Any] | None = None  # the mood update: {"before", "after", ...}
    quality: dict[str, Any] | None = None
    alternatives: list[dict[str, Any]] | None = None  # best of n: the candidates not kept
    adapter: str | None = None  # the LoRA that answered ("slug@vN"), None for the base model


def store_replies(*, session: Session, token: uuid.UUID, outcomes: Sequence[TurnOutcome]) -> list[uuid.UUID]:
    """complete: write each turn's user line and reply and mark it done, in the caller's transaction.

    Only turns still running under this claim token are written, so a worker whose lease lapsed
    while another answered the turn stores nothing. The partial unique index on messages
    (turn_id, role) backs that up: a turn's reply can only ever be stored once. Returns the turn ids
    this call stored.
    """
    if not outcomes:
        return []
    conv_ids = sorted({o.conversation_id for o in outcomes})
    # Row locks in id order (conversations, then turns) serialise writers without deadlocks.
    session.execute(
        select(Conversation.id)
        .where(Conversation.id.in_(conv_ids))
        .order_by(Conversation.id)
        .with_for_update()
    )
    owned = set(
        session.scalars(
            select(Turn.id)
            .where(Turn.id.in_([o.turn_id for o in outcomes]), _ours(token))
            .order_by(Turn.id)
            .with_for_update()
        ).all()
    )
    outcomes = [o for o in outcomes if o.turn_id in owned]
    if not outcomes:
        return []
    next_seq = dict(
        session.execute(
            select(Message.conversation_id, func.coalesce(func.max(Message.seq), 0))
            .where(Message.conversation_id.in_(conv_ids))
            .group_by(Message.conversation_id)
        )
        .tuples()
        .all()
    )
    rows = []
    for o in outcomes:
        seq = next_seq.get(o.conversation_id, 0)
        for offset, role, content, vector in (
            (1, Role.USER, o.user_message, o.user_embedding),
            (2, o.reply_role, o.reply, o.reply_embedding),
        ):
            rows.append(
                dict(
                    conversation_id=o.conversation_id,
                    seq=seq + offset,
                    role=role,
                    content=content,
                    embedding=vector,
                    turn_id=o.turn_id,
                )
            )
        next_seq[o.conversation_id] = seq + 2
    stmt = (
        insert(Message)
        .on_conflict_do_nothing(
            index_elements=[Message.turn_id, Message.role], index_where=text("turn_id IS NOT NULL")
        )
        .returning(Message.id, Message.turn_id, Message.role)
    )
    inserted: dict[uuid.UUID, dict[Role, int]] = {}
    for msg_id, turn_id, role in session.execute(stmt, rows).tuples():
        if turn_id is not None:
            inserted.setdefault(turn_id, {})[Role(role)] = msg_id
    stored = [o for o in outcomes if o.reply_role in inserted.get(o.turn_id, {})]
    if not stored:
        return []
    finished_at = datetime.now(UTC)
    session.execute(
        update(Turn).where(_ours(token)),
        [
            dict(
                id=o.turn_id,
                status=TurnStatus.DONE,
                reply=o.reply,
                prompt=o.prompt,
                context=o.context,
                usage=o.usage,
                timings=o.timings,
                params=o.params,
                state=o.state,
                quality=o.quality,
                alternatives=o.alternatives,
                adapter=o.adapter,
                error=None,
                error_code=None,
                user_message_id=inserted[o.turn_id].get(Role.USER),
                reply_message_id=inserted[o.turn_id][o.reply_role],
                finished_at=finished_at,
                lease_until=None,
            )
            for o in stored
        ],
        execution_options={"synchronize_session": None},
    )
    moods = [o for o in stored if o.state is not None]
    if moods:  # in the reply's transaction: the state never moves without the reply that moved it
        session.execute(
            update(Conversation),
            [
                dict(
                    id=o.conversation_id,
                    emotion=o.state["after"]["emotion"],  # type: ignore[index]
                    affinity=o.state["after"]["affinity"],  # type: ignore[index]
                )
                for o in moods
            ],
        )
    done = [o.turn_id for o in stored]
    advance_runs_of_turns(session=session, turn_ids=done)
    return done


@dataclass(frozen=True)
class Failure:
    """Why a claimed turn failed: the text for people, the code for machines."""

    reason: str
    code: TurnErrorCode


def fail_turns(
    *,
    session: Session,
    token: uuid.UUID,
    failures: dict[uuid.UUID, Failure],
    timings: dict[str, Any] | None = None,
) -> list[uuid.UUID]:
    """fail: mark turns running under this claim failed with their reason; returns those failed."""
    if not failures:
        return []
    failed = list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(failures)), _ours(token))
            .values(
                status=TurnStatus.FAILED,
                error=_by_id({t: f.reason[:ERROR_CHARS] for t, f in failures.items()}),
                error_code=_by_id({t: f.code.value for t, f in failures.items()}),
                timings=timings,
                finished_at=func.now(),
                lease_until=None,
            )
            .returning(Turn.id)
        ).all()
    )
    if failed:
        advance_runs_of_turns(session=session, turn_ids=failed)
    return failed


def requeue_turns(
    *, session: Session, token: uuid.UUID, reasons: dict[uuid.UUID, str], refund_attempt: bool = False
) -> list[uuid.UUID]:
    """requeue: put turns running under this claim back to queued, keeping each one's reason.

    `refund_attempt` hands the attempt back too: the turn was not at fault (its engine died).
    The caller sends them again after the commit, so they are stamped dispatched now.
    """
    if not reasons:
        return []
    return list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(reasons)), _ours(token))
            .values(
                status=TurnStatus.QUEUED,
                error=_by_id({t: r[:ERROR_CHARS] for t, r in reasons.items()}),
                attempts=func.greatest(Turn.attempts - 1, 0) if refund_attempt else Turn.attempts,
                lease_until=None,
                dispatched_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )


def cancel_turns(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """cancel: turns that have not started; returns those cancelled."""
    cancelled = list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(turn_ids)), Turn.status == TurnStatus.QUEUED)
            .values(status=TurnStatus.CANCELLED, finished_at=func.now())
            .returning(Turn.id)
        ).all()
    )
    if cancelled:
        advance_runs_of_turns(session=session, turn_ids=cancelled)
    return cancelled


def fail_unsent(*, session: Session, turn_ids: Sequence[uuid.UUID], reason: str) -> list[uuid.UUID]:
    """fail_unsent: queued turns whose message could not be sent (broker down at enqueue)."""
    return list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(turn_ids)), Turn.status == TurnStatus.QUEUED, Turn.attempts == 0)
            .values(
                status=TurnStatus.FAILED,
                error=reason[:ERROR_CHARS],
                error_code=TurnErrorCode.BROKER_UNREACHABLE.value,
                finished_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )


def revive_unsent(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """revive_unsent: turns that failed only because they were never sent go back to queued."""
    return list(
        session.scalars(
            update(Turn)
            .where(
                Turn.id.in_(list(turn_ids)),
                Turn.status == TurnStatus.FAILED,
                Turn.error_code == TurnErrorCode.BROKER_UNREACHABLE.value,
            )
            .values(
                status=TurnStatus.QUEUED,
                error=None,
                error_code=None,
                finished_at=None,
                dispatched_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )


def mark_dispatched(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> int:
    """Record that a message for these queued turns was just sent (resumed submissions and the
    sweeper read it). Rows another transaction holds (a worker claiming them) are skipped rather
    than waited for: they are being taken anyway, and waiting could deadlock with that claim."""
    if not turn_ids:
        return 0
    free = (
        select(Turn.id)
        .where(Turn.id.in_(list(turn_ids)), Turn.status == TurnStatus.QUEUED)
        .order_by(Turn.id)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = session.execute(update(Turn).where(Turn.id.in_(free)).values(dispatched_at=func.now()))
    return int(result.rowcount)  # type: ignore[attr-defined]


def get_turn(*, session: Session, turn_id: uuid.UUID) -> Turn | None:
    """The turn row, or None."""
    return session.get(Turn, turn_id)
