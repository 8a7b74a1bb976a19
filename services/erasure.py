"""Erasing what a tenant holds about a player (a game's account deletion, a data-protection request):
the player's conversations with all that hangs off them, and the facts about the player."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError

from db.erasure import AnotherPlayers, Erased, PlayerBusy, erase_player
from db.session import again_on_conflict, rolled_back_for_a_conflict, session_scope
from services.original_request import inline_histories
from services.schemas import owner_fault, text_fault

logger = logging.getLogger(__name__)

__all__ = ["Erased", "ErasureContended", "ErasureRefused", "PlayerBusy", "erase"]


class ErasureRefused(ValueError):
    """A player or tenant the API would not take: `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


# Tries in all of an erasure that gives way to writers holding its rows (db/erasure.py
# LOCK_TIMEOUT_MS each): a reply's store or a desk edit ends within a few of them.
LOCK_TRIES = 10
MAX_CONVERSATIONS = 1000  # named in one erasure


class ErasureContended(Exception):
    """The player's rows stayed locked by other writers through every try: nothing was deleted."""


def erase(tenant: str, player: str, conversations: Sequence[str] = ()) -> Erased:
    """Delete the tenant's data about `player` in one transaction: its conversations recorded with
    the player's id and those named (`conversations`, the game's ids), with all below them, and the
    facts about the player or read from those lines; what was deleted, counted (zeros for a player
    the tenant holds nothing about, so a retry is safe). PlayerBusy, deleting nothing, while any of
    its turns is queued or running; ErasureContended when other writers held its rows throughout."""
    fault = owner_fault(tenant, player)
    if fault is not None:
        raise ErasureRefused(*fault)
    if len(conversations) > MAX_CONVERSATIONS:
        raise ErasureRefused("conversations", f"{len(conversations)} named; the limit is {MAX_CONVERSATIONS}")
    for i, name in enumerate(conversations):
        wrong = text_fault(name, 200)
        if wrong is not None:
            raise ErasureRefused(f"conversations[{i}]", wrong)

    def write() -> Erased:
        with session_scope() as session:
            return erase_player(
                session=session,
                tenant=tenant,
                player_id=player,
                conversations=conversations,
                kept_for=inline_histories(conversations),
            )

    try:
        erased = again_on_conflict(write, what="a player's erasure", tries=LOCK_TRIES, also=_lock_timed_out)
    except AnotherPlayers as exc:
        raise ErasureRefused(f"conversations[{exc.index}]", str(exc)) from None
    except OperationalError as exc:
        if _lock_timed_out(exc) or rolled_back_for_a_conflict(exc):  # at every try
            raise ErasureContended(
                "other writers held the player's rows throughout (a reply being stored, a "
                "writer's edit, a batch's output file being written from its lines); nothing was "
                "erased: try again"
            ) from exc
        raise
    # No player id in its own log line: the record of an erasure should not keep what it erased.
    logger.info("erased a player of tenant %r: %s", tenant, erased)
    return erased


def _lock_timed_out(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"  # lock_not_available
