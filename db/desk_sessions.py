"""Desk sessions ended by signing out: the cookie is signed, not stored, so an ended one is recorded
until it would have expired."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, exists, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import DeskSignOut

# Expired records go a few at a time at each sign-out: the table never holds more than a day's.
PRUNE_ROWS = 100
# A record is kept this long past its cookie's expiry: the expiry is checked on an API host's clock,
# the record pruned on the database's, and a host a minute behind took a signed-out cookie again in
# the minute between (review, stop 75). Far more than any skew between hosts.
PRUNE_AFTER_S = 86_400


def sign_out(*, session: Session, session_mac: str, expires_at: datetime) -> None:
    """Record the session as ended (again: nothing changes) and drop a few records past expiry."""
    session.execute(
        insert(DeskSignOut).values(session_mac=session_mac, expires_at=expires_at).on_conflict_do_nothing()
    )
    expired = (
        select(DeskSignOut.session_mac)
        .where(DeskSignOut.expires_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, PRUNE_AFTER_S))
        .limit(PRUNE_ROWS)
        .with_for_update(skip_locked=True)
    )
    session.execute(delete(DeskSignOut).where(DeskSignOut.session_mac.in_(expired.scalar_subquery())))


def signed_out(*, session: Session, session_mac: str) -> bool:
    """Whether the session was ended by signing out."""
    return bool(session.scalar(select(exists().where(DeskSignOut.session_mac == session_mac))))
