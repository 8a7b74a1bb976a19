"""Keep a claim alive while it runs: renew its lease from a thread (a batch's turns; a memory job's
claim through memory/claim.py).

The lease is what tells other workers that a running turn is still being answered. It is renewed
every third of its length while the batch runs, and no longer than `max_hold_s` in all, so a worker
that hangs (rather than dies) lets its turns go in the end too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session

from db.session import session_scope
from db.turns import renew_lease

logger = logging.getLogger(__name__)

# After a renewal that failed (the database away), the next one comes this soon rather than a third
# of a lease later: a lease that lapsed during a long outage is renewed as soon as the database is
# back, before a sweep or a later turn's claim takes the turns over and charges them an attempt.
AGAIN_AFTER_FAILURE_S = 1.0


class LeaseKeeper:
    """`with LeaseKeeper(token, lease_s, max_hold_s): ...` renews the claim's lease in the background:
    a batch's turns, or with `renew` another claim under that token (a memory job's)."""

    def __init__(
        self,
        token: uuid.UUID,
        lease_s: float,
        max_hold_s: float,
        renew: Callable[[Session], object] | None = None,
        turn_ids: Sequence[uuid.UUID] | None = None,
    ) -> None:
        self.token = token
        self.lease_s = lease_s
        self.renew = renew or (
            lambda session: renew_lease(session=session, token=token, lease_s=lease_s, turn_ids=turn_ids)
        )
        self.deadline = time.monotonic() + max_hold_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{token.hex[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        period = self.lease_s / 3
        wait, failing = period, False
        while not self._stop.wait(wait):
            if time.monotonic() >= self.deadline:
                logger.warning("claim %s held past its limit; its lease is left to expire", self.token)
                return
            try:
                with session_scope() as session:
                    self.renew(session)
                wait, failing = period, False
            except Exception as exc:  # the database is away: tried again soon, its traceback logged once
                logger.warning(
                    "could not renew the lease of claim %s%s",
                    self.token,
                    f" (again: {type(exc).__name__})" if failing else "",
                    exc_info=not failing,
                )
                wait, failing = min(period, AGAIN_AFTER_FAILURE_S), True
