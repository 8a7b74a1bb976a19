"""Per-turn completion callbacks: the finished turn POSTed to its `callback_url`, signed and retried
exactly as batch callbacks are (services/callbacks.py, tasks/callbacks.py)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence

from db.models import TURN_FINISHED, Turn
from db.session import session_scope
from services.callbacks import recorder, send_once
from services.producer import TurnView

logger = logging.getLogger(__name__)


def deliver_turn(turn_id: uuid.UUID) -> bool:
    """POST the finished turn once (as its key reads it: no prompt); True when delivered or nothing to
    deliver, False when its destination is refused now (not retried), CallbackFailed to retry."""
    with session_scope() as session:
        turn = session.get(Turn, turn_id)
        if turn is None or not turn.callback_url or turn.callback_delivered_at is not None:
            return True
        if turn.status not in TURN_FINISHED:
            return True
        view = TurnView.of(turn).as_its_tenant_sees()
        url, body = turn.callback_url, json.dumps(view.model_dump(mode="json"), ensure_ascii=False).encode()
        tenant = turn.tenant
    return send_once(url, body, tenant=tenant, delivery=str(turn_id), record=recorder(Turn, turn_id))


def send_turn_callbacks(turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Queue the callbacks of finished turns that asked for one; those that could not be queued (a
    message lost to a broker outage is queued again by housekeeping: services/batches.py
    redeliver_turn_callbacks). After the first publish that fails, the rest are not tried: each try
    at a broker away waits out its connection retries, and a worker's flush or a cancel waits on
    them all."""
    from tasks.callbacks import deliver_turn_callback

    for i, turn_id in enumerate(turn_ids):
        try:
            deliver_turn_callback.delay(str(turn_id))
        except Exception:
            logger.warning(
                "turn %s: could not queue its callback; %d more left to housekeeping",
                turn_id,
                len(turn_ids) - i - 1,
                exc_info=True,
            )
            return list(turn_ids[i:])
    return []
