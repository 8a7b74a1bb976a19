"""A player's erasure: every conversation a tenant holds with the player, with all that hangs off it
(turns and their prompts and reviews, lines and their vectors, summaries, memory jobs, scenes and
members), and every fact about the player or read from those lines, in one transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from db.models import (
    TURN_UNFINISHED,
    Conversation,
    Fact,
    MemoryJob,
    Message,
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


def erase_player(*, session: Session, tenant: str, player_id: str) -> Erased:
    """Delete the tenant's data about `player_id` (PlayerBusy while any of it is in flight; nothing
    is deleted then). Locks in the order the other writers take them: the conversations' memory
    jobs (a summary's store holds its job, then its insert key-shares the conversation), the
    conversations (an enqueue into one waits for the erasure and then finds it gone, db/world.py
    find_conversations; a turn stored before is seen here), their turns, and facts last."""
    if not player_id:  # '' is every conversation that named no player
        raise ValueError("an erasure names a player")
    theirs = (Conversation.tenant == tenant, Conversation.player_id == player_id)
    session.execute(
        select(MemoryJob.conversation_id)
        .join(Conversation, Conversation.id == MemoryJob.conversation_id)
        .where(*theirs)
        .order_by(MemoryJob.conversation_id, MemoryJob.kind)
        .with_for_update(of=MemoryJob)
    )
    ids = list(
        session.scalars(
            select(Conversation.id).where(*theirs).order_by(Conversation.id).with_for_update()
        ).all()
    )

    def of_them(column: Any) -> Any:
        return any_of(column, ids, BigInteger)

    def count(*where: Any) -> int:
        return session.scalar(select(func.count()).where(*where)) or 0

    # Their turns too, before they are read (conversation, then turns: the order a reply's store
    # takes): a failed line a run's retry requeues meanwhile, or a scene step, is an UPDATE that
    # never touches the conversation; read unlocked, it was deleted queued, and its run never ended.
    turn_states = session.execute(
        select(Turn.id, Turn.status, Turn.number)
        .where(of_them(Turn.conversation_id))
        .order_by(Turn.id)
        .with_for_update()
    ).all()
    busy = [
        turn_id
        for turn_id, status, _ in sorted(turn_states, key=lambda row: row[2])
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
    # extraction's store lock its turn, lines and memory job first and facts last; the other way
    # round, each waited for the other (a deadlock). Facts read from them keep their id: no key.
    conversations = session.scalars(
        delete(Conversation).where(of_them(Conversation.id)).returning(Conversation.id)
    ).all()
    read_from_them = and_(Fact.source_conversation_id.is_not(None), of_them(Fact.source_conversation_id))
    facts = session.scalars(
        delete(Fact)
        .where(Fact.tenant == tenant, or_(Fact.player_id == player_id, read_from_them))
        .returning(Fact.id)
    ).all()
    return Erased(len(conversations), len(turn_states), messages, summaries, len(facts))
