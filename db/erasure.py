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
    is deleted then). The conversations are locked first: an enqueue into one waits for the erasure
    and then finds it gone (db/world.py find_conversations), a turn stored before is seen here."""
    if not player_id:  # '' is every conversation that named no player
        raise ValueError("an erasure names a player")
    ids = list(
        session.scalars(
            select(Conversation.id)
            .where(Conversation.tenant == tenant, Conversation.player_id == player_id)
            .order_by(Conversation.id)
            .with_for_update()
        ).all()
    )

    def of_them(column: Any) -> Any:
        return any_of(column, ids, BigInteger)

    def count(*where: Any) -> int:
        return session.scalar(select(func.count()).where(*where)) or 0

    busy = list(
        session.scalars(
            select(Turn.id)
            .where(of_them(Turn.conversation_id), Turn.status.in_(TURN_UNFINISHED))
            .order_by(Turn.number)
        ).all()
    )
    open_run_scenes = count(
        of_them(Scene.conversation_id), Scene.run_id.is_not(None), Scene.status == SceneStatus.OPEN
    )
    if busy or open_run_scenes:
        raise PlayerBusy(busy, open_run_scenes)
    turns = count(of_them(Turn.conversation_id))
    messages = count(of_them(Message.conversation_id))
    summaries = count(of_them(Summary.conversation_id))
    read_from_them = and_(Fact.source_conversation_id.is_not(None), of_them(Fact.source_conversation_id))
    facts = session.scalars(
        delete(Fact)
        .where(Fact.tenant == tenant, or_(Fact.player_id == player_id, read_from_them))
        .returning(Fact.id)
    ).all()
    conversations = session.scalars(
        delete(Conversation).where(of_them(Conversation.id)).returning(Conversation.id)
    ).all()
    return Erased(len(conversations), turns, messages, summaries, len(facts))
