"""Which models a worker serves: asked of the workers themselves (Celery's remote control), and how
long each model with live turns waiting has gone unserved, as the sweeps saw it (marks in Redis)."""

from __future__ import annotations

import logging
from collections.abc import Collection

from core.settings import BULK_QUEUE_SUFFIX
from tasks.app import app

logger = logging.getLogger(__name__)

ASK_S = 1.0  # how long the sweep waits for the workers' answers
_UNSERVED_SINCE = "mlchat:unserved-since:"  # + model: the broker's time a sweep first found it unserved


def served_models() -> set[str] | None:
    """The models whose live queue (`gen.<model>`) some worker consumes now, as the workers answer
    within ASK_S; None when the broker cannot be asked (nothing is known then)."""
    try:
        answers = app.control.inspect(timeout=ASK_S).active_queues() or {}
    except Exception:
        logger.warning("could not ask the workers which queues they consume", exc_info=True)
        return None
    return {
        queue["name"].removeprefix("gen.")
        for queues in answers.values()
        for queue in queues or ()
        if isinstance(queue, dict)
        and str(queue.get("name", "")).startswith("gen.")
        and not str(queue["name"]).endswith(BULK_QUEUE_SUFFIX)
    }


def unserved_for(waiting: Collection[str], served: Collection[str]) -> dict[str, float]:
    """Seconds each of the `waiting` models (live turns wait for it) not in `served` has been found
    unserved by the sweeps without a break, on the broker's clock (0 the first time); the marks of
    the `served` ones are cleared, so that a model served again starts afresh."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        now = float(client.time()[0])
        for model in served:
            client.delete(_UNSERVED_SINCE + model)
        absent: dict[str, float] = {}
        for model in waiting:
            if model in served:
                continue
            key = _UNSERVED_SINCE + model
            client.set(key, int(now), nx=True)
            since = client.get(key)
            absent[model] = max(0.0, now - float(since)) if since is not None else 0.0
        return absent
