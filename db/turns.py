"""Every query on the turn lifecycle: create (idempotent), claim, finish, fail, requeue, cancel, read."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from db.models import Character, Conversation, Message, Role, Turn, TurnStatus

UNFINISHED = (TurnStatus.QUEUED, TurnStatus.RUNNING)


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


@dataclass
class ClaimResult:
    """The claim's outcome for each turn id of a batch."""

    claimed: list[ClaimedTurn] = field(default_factory=list)
    # An earlier turn of its conversation is unfinished.
    deferred: list[uuid.UUID] = field(default_factory=list)
    skipped: list[uuid.UUID] = field(default_factory=list)  # done, failed, cancelled or unknown
    exhausted: list[uuid.UUID] = field(default_factory=list)  # failed now: no attempts left


def create_turns(*, session: Session, turns: Sequence[NewTurn]) -> list[tuple[uuid.UUID, bool]]:
    """Insert turns, deduplicating on idempotency key; returns (turn id, newly created) in input order."""
    if not turns:
        return []
    rows = [dict(id=uuid.uuid4(), **t.__dict__) for t in turns]
    stmt = (
        insert(Turn)
        .on_conflict_do_nothing(index_elements=[Turn.idempotency_key])
        .returning(Turn.idempotency_key, Turn.id)
    )
    created: dict[str, uuid.UUID] = dict(session.execute(stmt, rows).tuples().all())
    repeated = {t.idempotency_key for t in turns} - created.keys()
    known = (
        {
            key: (request_hash, turn_id)
            for key, request_hash, turn_id in session.execute(
                select(Turn.idempotency_key, Turn.request_hash, Turn.id).where(
                    Turn.idempotency_key.in_(repeated)
                )
            ).tuples()
        }
        if repeated
        else {}
    )
    out = []
    for t in turns:
        if t.idempotency_key in created:
            out.append((created[t.idempotency_key], True))
            continue
        request_hash, turn_id = known[t.idempotency_key]
        if request_hash != t.request_hash:
            raise IdempotencyConflict(
                f"idempotency key {t.idempotency_key!r} was already used for a different request"
            )
        out.append((turn_id, False))
    return out


def claim_turns(
    *, session: Session, turn_ids: Sequence[uuid.UUID], stale_after_s: float, max_attempts: int
) -> ClaimResult:
    """Mark the batch's claimable turns running (attempts + 1) and load what the pipeline needs.

    A turn that has used up `max_attempts` is failed here instead (the dead-letter state), so a
    message that keeps coming back, because its batch keeps dying, cannot loop forever.

    A turn is deferred while an earlier turn of its conversation is unfinished, so a conversation's
    turns are answered in order and each sees the previous reply; an earlier turn running for
    longer than `stale_after_s` (the broker's visibility timeout) no longer blocks, since its worker
    is presumed gone. A turn already running is re-claimed: its message was redelivered.
    """
    earlier = aliased(Turn)
    stale_before = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, stale_after_s)
    blocked = exists().where(
        earlier.conversation_id == Turn.conversation_id,
        earlier.number < Turn.number,
        or_(
            earlier.status == TurnStatus.QUEUED,
            and_(earlier.status == TurnStatus.RUNNING, earlier.started_at > stale_before),
        ),
    )
    exhausted = session.scalars(
        update(Turn)
        .where(Turn.id.in_(turn_ids), Turn.status.in_(UNFINISHED), Turn.attempts >= max_attempts)
        .values(
            status=TurnStatus.FAILED,
            finished_at=func.now(),
            error=func.concat(
                f"gave up after {max_attempts} attempts; last error: ",
                func.coalesce(Turn.error, "the batch died"),
            ),
        )
        .returning(Turn.id)
    ).all()
    claimed_ids = session.scalars(
        update(Turn)
        .where(Turn.id.in_(turn_ids), Turn.status.in_(UNFINISHED), ~blocked)
        .values(status=TurnStatus.RUNNING, attempts=Turn.attempts + 1, started_at=func.now())
        .returning(Turn.id)
    ).all()
    result = ClaimResult(exhausted=list(exhausted))
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
                )
            )
    unclaimed = [i for i in turn_ids if i not in set(claimed_ids) | set(exhausted)]
    if unclaimed:
        still_open = set(
            session.scalars(select(Turn.id).where(Turn.id.in_(unclaimed), Turn.status.in_(UNFINISHED))).all()
        )
        for turn_id in unclaimed:
            (result.deferred if turn_id in still_open else result.skipped).append(turn_id)
    return result


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


def store_replies(*, session: Session, outcomes: Sequence[TurnOutcome]) -> list[uuid.UUID]:
    """Write each turn's user line and reply and mark it done, all in the caller's one transaction.

    Exactly-once: the partial unique index on messages (turn_id, role) makes a second write of the
    same turn's reply a no-op, and only the writer whose insert landed updates the turn. Returns the
    turn ids this call stored.
    """
    if not outcomes:
        return []
    conv_ids = sorted({o.conversation_id for o in outcomes})
    # Row locks in id order serialise concurrent writers of one conversation without deadlocks.
    session.execute(
        select(Conversation.id)
        .where(Conversation.id.in_(conv_ids))
        .order_by(Conversation.id)
        .with_for_update()
    )
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
    finished_at = datetime.now(UTC)
    if stored:
        session.execute(
            update(Turn),
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
                    error=None,
                    user_message_id=inserted[o.turn_id].get(Role.USER),
                    reply_message_id=inserted[o.turn_id][o.reply_role],
                    finished_at=finished_at,
                )
                for o in stored
            ],
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
    return [o.turn_id for o in stored]


def fail_turns(
    *, session: Session, errors: dict[uuid.UUID, str], timings: dict[str, Any] | None = None
) -> None:
    """Mark turns failed with their reason (the dead-letter state); finished turns are left alone."""
    if not errors:
        return
    finished_at = datetime.now(UTC)
    session.execute(
        # No IN (...) here: an expanding parameter cannot go into an executemany.
        update(Turn).where(or_(Turn.status == TurnStatus.QUEUED, Turn.status == TurnStatus.RUNNING)),
        [
            dict(
                id=turn_id,
                status=TurnStatus.FAILED,
                error=reason[:2000],
                timings=timings,
                finished_at=finished_at,
            )
            for turn_id, reason in errors.items()
        ],
        execution_options={"synchronize_session": None},  # the extra WHERE keeps finished turns as they are
    )


def requeue_turns(*, session: Session, errors: dict[uuid.UUID, str]) -> None:
    """Put running turns back to queued, keeping the reason of their failed attempt."""
    if not errors:
        return
    session.execute(
        update(Turn).where(Turn.status == TurnStatus.RUNNING),
        [
            dict(id=turn_id, status=TurnStatus.QUEUED, error=reason[:2000])
            for turn_id, reason in errors.items()
        ],
        execution_options={"synchronize_session": None},
    )


def cancel_turns(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Cancel turns that have not started; returns those cancelled."""
    return list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(turn_ids), Turn.status == TurnStatus.QUEUED)
            .values(status=TurnStatus.CANCELLED, finished_at=func.now())
            .returning(Turn.id)
        ).all()
    )


def get_turn(*, session: Session, turn_id: uuid.UUID) -> Turn | None:
    """The turn row, or None."""
    return session.get(Turn, turn_id)
