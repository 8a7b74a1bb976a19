"""Erasing what a tenant holds about a player (a game's account deletion, a data-protection request):
the player's conversations with all that hangs off them, and the facts about the player."""

from __future__ import annotations

import logging

from db.erasure import Erased, PlayerBusy, erase_player
from db.session import again_on_conflict, session_scope
from services.schemas import owner_fault

logger = logging.getLogger(__name__)

__all__ = ["Erased", "ErasureRefused", "PlayerBusy", "erase"]


class ErasureRefused(ValueError):
    """A player or tenant the API would not take: `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def erase(tenant: str, player: str) -> Erased:
    """Delete the tenant's data about `player` in one transaction (run again if a deadlock ended it):
    what was deleted, counted; zeros for a player the tenant holds nothing about, so a retry is
    safe. PlayerBusy, deleting nothing, while any of its turns is queued or running."""
    fault = owner_fault(tenant, player)
    if fault is not None:
        raise ErasureRefused(*fault)

    def write() -> Erased:
        with session_scope() as session:
            return erase_player(session=session, tenant=tenant, player_id=player)

    erased = again_on_conflict(write, what="a player's erasure")
    # No player id in the log: the record of an erasure should not keep what it erased.
    logger.info("erased a player of tenant %r: %s", tenant, erased)
    return erased
