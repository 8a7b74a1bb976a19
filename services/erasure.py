"""Erasing what a tenant holds about a player (a game's account deletion, a data-protection request):
the player's conversations with all that hangs off them, and the facts about the player."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

from db.erasure import AnotherPlayers, Erased, PlayerBusy, erase_player
from db.session import rolled_back_for_a_conflict, session_scope
from services.schemas import owner_fault, storable_text

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
        if not name or len(name) > 200:
            raise ErasureRefused(
                f"conversations[{i}]", "empty" if not name else f"{len(name)} characters; the limit is 200"
            )
        try:
            storable_text(name)
        except ValueError as exc:
            raise ErasureRefused(f"conversations[{i}]", str(exc)) from None

    def write() -> Erased:
        with session_scope() as session:
            return erase_player(session=session, tenant=tenant, player_id=player, conversations=conversations)

    for attempt in Retrying(
        retry=retry_if_exception(lambda exc: rolled_back_for_a_conflict(exc) or _lock_timed_out(exc)),
        stop=stop_after_attempt(LOCK_TRIES),
        wait=wait_random(0.05, 0.3),
        reraise=True,
    ):
        with attempt:
            try:
                erased = write()
            except AnotherPlayers as exc:
                raise ErasureRefused(f"conversations[{exc.index}]", str(exc)) from None
            except OperationalError as exc:
                contended = _lock_timed_out(exc) or rolled_back_for_a_conflict(exc)
                if contended and attempt.retry_state.attempt_number >= LOCK_TRIES:
                    raise ErasureContended(
                        "other writers held the player's rows throughout (a reply being stored, a "
                        "writer's edit); nothing was erased: try again"
                    ) from exc
                raise
    # No player id in its own log line: the record of an erasure should not keep what it erased.
    logger.info("erased a player of tenant %r: %s", tenant, erased)
    return erased


def _lock_timed_out(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"  # lock_not_available
