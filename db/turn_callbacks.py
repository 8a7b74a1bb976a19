"""Per-turn callback bookkeeping: which finished turns asked for one, and each delivery attempt."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Turn


def with_callbacks(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """The turns among `turn_ids` that have a callback URL."""
    if not turn_ids:
        return []
    return list(
        session.scalars(select(Turn.id).where(Turn.id.in_(list(turn_ids)), Turn.callback_url.is_not(None)))
    )


def record_turn_callback(*, session: Session, turn_id: uuid.UUID, error: str | None) -> int:
    """One delivery attempt: delivered (error None) or not, with why; returns the attempts so far.
    A delivered callback is never recorded again."""
    attempts = session.scalar(
        update(Turn)
        .where(Turn.id == turn_id, Turn.callback_delivered_at.is_(None))
        .values(
            callback_attempts=Turn.callback_attempts + 1,
            callback_error=error,
            callback_delivered_at=func.now() if error is None else None,
        )
        .returning(Turn.callback_attempts)
    )
    return int(attempts or 0)
