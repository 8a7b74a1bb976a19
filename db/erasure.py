"""A player's erasure: every conversation a tenant holds with the player, with all that hangs off it
(turns and their prompts and reviews, lines and their vectors, summaries, memory jobs, scenes and
members), and every fact about the player or read from those lines, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, String, and_, delete, func, or_, select, text
from sqlalchemy.orm import Session

from db.advisory_locks import name_key
from db.models import (
    TURN_UNFINISHED,
    Conversation,
    Fact,
    MemoryJob,
    Message,
    Run,
    Scene,
    SceneStatus,
    Summary,
    Turn,
)
from db.params import any_of

BUSY_NAMED = 10  # unfinished turns a refusal names


@dataclass(frozen=True)
class Erased:
    """What an erasure deleted, counted."""

    conversations: int
    turns: int
    messages: int
    summaries: int
    facts: int


class PlayerBusy(Exception):
    """The player has turns still queued or running, or a scene of a run still open: erasing now
    would leave a worker answering a conversation that is gone, or a run short of a scene."""

    def __init__(self, turn_ids: list[uuid.UUID], open_run_scenes: int) -> None:
        self.turn_ids, self.open_run_scenes = turn_ids, open_run_scenes
        said = []
        if turn_ids:
            more = ", …" if len(turn_ids) > BUSY_NAMED else ""
            said.append(f"turns still queued or running ({', '.join(map(str, turn_ids[:BUSY_NAMED]))}{more})")
        if open_run_scenes:
            said.append(f"{open_run_scenes} scene(s) of a run still open")
        super().__init__(
            "the player has " + " and ".join(said) + ": cancel them or wait until they end, then erase again"
        )


class AnotherPlayers(ValueError):
    """A conversation the erasure was told to take is recorded as another player's."""

    def __init__(self, index: int, name: str) -> None:
        super().__init__(f"conversation {name!r} is another player's")
        self.index, self.name = index, name


_PLAYER_LOCK_NAMESPACE = 0x6D6C6572  # "mler"


def hold_player(*, session: Session, tenant: str, player_id: str, shared: bool = True) -> None:
    """The player's lock for this transaction: shared by each write of facts about the player, held
    alone by an erasure, so a fact written while the erasure runs waits for it and is written after
    (never one slipping in after its delete read the facts, left behind by an erasure that said done)."""
    lock = func.pg_advisory_xact_lock_shared if shared else func.pg_advisory_xact_lock
    session.execute(select(lock(_PLAYER_LOCK_NAMESPACE, name_key(f"{tenant}\n{player_id}"))))


# How long the erasure waits for any one lock before it gives way (rolled back, run again by its
# caller): shorter than PostgreSQL's deadlock_timeout (1 s by default), so in any cycle of waits
# with a writer that takes these rows in another order (the desk's edit of a line: its turn, then
# its memory jobs; a reply's store: the conversation, then its turns), the erasure is normally the
# one that yields (a writer that began waiting well before it may still be the deadlock's victim).
LOCK_TIMEOUT_MS = 500


def erase_player(
    *,
    session: Session,
    tenant: str,
    player_id: str,
    conversations: Sequence[str] = (),
    kept_for: Sequence[str] = (),
) -> Erased:
    """Delete the tenant's data about `player_id`: its conversations recorded with the player's id,
    and those named in `conversations` (the game's ids: a live group, a run's line, a conversation
    started without a player id record none; AnotherPlayers for one recorded as another's; a name
    the tenant does not hold is no error, so a retry goes through). PlayerBusy while any of it is
    in flight; nothing is deleted then. Locks: the conversations' memory jobs, the conversations (an
    enqueue into one waits for the erasure and then finds it gone, db/world.py find_conversations;
    a turn stored before is seen here), their turns, their runs (shared: a batch file being written
    from them holds the erasure off), then facts; any wait past LOCK_TIMEOUT_MS
    raises (LockNotAvailable) and the caller runs it again. `kept_for`: conversations that keep the
    lines of named ones (an inline request's history, copied into the conversation it answered in),
    erased with them unless recorded as another player's (then left, never refused)."""
    if not player_id:  # '' is every conversation that named no player
        raise ValueError("an erasure names a player")
    session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
    hold_player(session=session, tenant=tenant, player_id=player_id, shared=False)
    names = list(dict.fromkeys(conversations))
    theirs = (
        Conversation.tenant == tenant,
        or_(
            Conversation.player_id == player_id,
            any_of(Conversation.external_id, names, String),
            and_(
                any_of(Conversation.external_id, list(kept_for), String),
                Conversation.player_id.in_(("", player_id)),
            ),
        ),
    )
    session.execute(
        select(MemoryJob.conversation_id)
        .join(Conversation, Conversation.id == MemoryJob.conversation_id)
        .where(*theirs)
        .order_by(MemoryJob.conversation_id, MemoryJob.kind)
        .with_for_update(of=MemoryJob)
    )
    rows = session.execute(
        select(Conversation.id, Conversation.external_id, Conversation.player_id)
        .where(*theirs)
        .order_by(Conversation.id)
        .with_for_update()
    ).all()
    for _, external_id, owner in rows:
        if owner not in ("", player_id):
            raise AnotherPlayers(list(conversations).index(external_id), external_id)
    ids = [conv_id for conv_id, _, _ in rows]

    def of_them(column: Any) -> Any:
        return any_of(column, ids, BigInteger)

    def count(*where: Any) -> int:
        return session.scalar(select(func.count()).where(*where)) or 0

    # Their turns too, before they are read (conversation, then turns: the order a reply's store
    # takes): a failed line a run's retry requeues meanwhile, or a scene step, is an UPDATE that
    # never touches the conversation; read unlocked, it was deleted queued, and its run never ended.
    turn_states = session.execute(
        select(Turn.id, Turn.status, Turn.number, Turn.run_id)
        .where(of_them(Turn.conversation_id))
        .order_by(Turn.id)
        .with_for_update()
    ).all()
    # Their runs shared (after the turns: a reply's store's order), which a batch's output file being
    # written, or rewritten after a desk change, holds for its whole writing (FOR NO KEY UPDATE): the
    # erasure waits, and gives way as for any writer, rather than answer before a file made after it
    # with the erased lines in it is listed (review).
    runs = sorted({run_id for *_, run_id in turn_states if run_id is not None})
    if runs:
        session.execute(select(Run.id).where(Run.id.in_(runs)).order_by(Run.id).with_for_update(read=True))
    busy = [
        turn_id
        for turn_id, status, _, _ in sorted(turn_states, key=lambda row: row[2])
        if status in TURN_UNFINISHED
    ]
    open_run_scenes = count(
        of_them(Scene.conversation_id), Scene.run_id.is_not(None), Scene.status == SceneStatus.OPEN
    )
    if busy or open_run_scenes:
        raise PlayerBusy(busy, open_run_scenes)
    messages = count(of_them(Message.conversation_id))
    summaries = count(of_them(Summary.conversation_id))
    # The conversations (and all below them) before the facts: the desk's edit of a line and a fact
    # extraction's store lock its turn, lines and memory job first and facts last. Facts read from
    # them keep their id: no key.
    conversations_deleted = session.scalars(
        delete(Conversation).where(of_them(Conversation.id)).returning(Conversation.id)
    ).all()
    read_from_them = and_(Fact.source_conversation_id.is_not(None), of_them(Fact.source_conversation_id))
    facts = session.scalars(
        delete(Fact)
        .where(Fact.tenant == tenant, or_(Fact.player_id == player_id, read_from_them))
        .returning(Fact.id)
    ).all()
    return Erased(len(conversations_deleted), len(turn_states), messages, summaries, len(facts))
