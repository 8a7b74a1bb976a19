"""Which stored lines NPC memory (summaries, extracted facts) may read: not a reply a writer rejected
on the desk. The line stays in the conversation (the player may have read it); what the NPC learns and
recalls of the conversation leaves it out, as training sets do."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists

from db.models import Message, ReviewLabel, Role, TurnReview


def memory_may_read() -> Any:
    """A condition on Message: a player's line, or a reply no writer holds rejected."""
    return ~exists().where(
        TurnReview.turn_id == Message.turn_id,
        TurnReview.label == ReviewLabel.REJECTED.value,
        Message.role != Role.USER,
    )


# The same condition in SQL, on a `messages` row named m (the due queries are SQL text).
MEMORY_MAY_READ_SQL = (
    "NOT EXISTS (SELECT 1 FROM turn_reviews r"
    " WHERE r.turn_id = m.turn_id AND r.label = 'rejected' AND m.role <> 'user')"
)
