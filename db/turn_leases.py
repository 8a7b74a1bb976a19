"""Which turns a claim may take: the one predicate the claim (db/turns.py) and a run's cancel
(db/runs.py) share, so a cancel takes exactly the turns a claim would have."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, or_

from db.models import Turn, TurnStatus


def lease_live() -> Any:
    """A running turn's lease has not expired (a turn from before leases has none: not live)."""
    return and_(Turn.lease_until.is_not(None), Turn.lease_until > func.now())


def claimable() -> Any:
    """Queued, or running under a lease that expired (its worker is presumed gone)."""
    return or_(Turn.status == TurnStatus.QUEUED, and_(Turn.status == TurnStatus.RUNNING, ~lease_live()))
