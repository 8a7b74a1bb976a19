"""Which models a worker serves: asked of the workers themselves (Celery's remote control), and how
long each model with live turns waiting has gone unserved, as the sweeps saw it (one Redis hash)."""

from __future__ import annotations

import logging
from collections.abc import Collection

from core.settings import BULK_QUEUE_SUFFIX
from tasks.app import app

logger = logging.getLogger(__name__)

ASK_S = 1.0  # how long the sweep waits for the workers' answers
MARKS_KEPT_S = 3600  # past this without a sweep, the marks go
# model -> the broker's time a sweep first found it unserved with live turns waiting, every sweep
# since finding it so: a model served again, or with nothing waiting, leaves it (review: a mark left
# from an outage weeks before made one missed answer fail a model's turns at once).
UNSERVED_SINCE = "mlchat:unserved-since"


def served_models() -> set[str] | None:
    """The models whose queue (`gen.<model>`, or its bulk one: a worker may consume that alone) some
    worker consumes now, as the workers answer within ASK_S; None when nothing is known: the broker
    cannot be asked, or no worker answered at all (none running, a sweeper on another broker, a
    serverless deployment: review, every model then counted unserved)."""
    try:
        answers = app.control.inspect(timeout=ASK_S).active_queues()
    except Exception:
        logger.warning("could not ask the workers which queues they consume", exc_info=True)
        return None
    if not answers:
        return None
    return {
        str(queue["name"]).removeprefix("gen.").removesuffix(BULK_QUEUE_SUFFIX)
        for queues in answers.values()
        for queue in queues or ()
        if isinstance(queue, dict) and str(queue.get("name", "")).startswith("gen.")
    }


def unserved_for(waiting: Collection[str], served: Collection[str]) -> dict[str, float]:
    """Seconds each of the `waiting` models (live turns wait for it) not in `served` has been found
    unserved by the sweeps without a break, on the broker's clock (0 the first time). Every other
    model's mark is dropped: one served, or with nothing waiting, starts afresh next time."""
    unserved = sorted(set(waiting) - set(served))
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        now = int(client.time()[0])
        gone = [m.decode() if isinstance(m, bytes) else m for m in client.hkeys(UNSERVED_SINCE)]
        if stale := [m for m in gone if m not in unserved]:
            client.hdel(UNSERVED_SINCE, *stale)
        for model in unserved:
            client.hsetnx(UNSERVED_SINCE, model, now)
        # Sweeps that stop for long (the sweeper down) leave no count to go on from: it restarts.
        client.expire(UNSERVED_SINCE, MARKS_KEPT_S)
        since = client.hmget(UNSERVED_SINCE, unserved) if unserved else []
        return {
            model: max(0.0, float(now - int(at))) if at is not None else 0.0
            for model, at in zip(unserved, since, strict=True)
        }
