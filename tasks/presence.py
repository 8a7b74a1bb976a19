"""Which models a worker serves: asked of the workers themselves (Celery's remote control), and how
long each model with live turns waiting has gone unserved, as the sweeps saw it (one Redis hash)."""

from __future__ import annotations

import logging
from collections.abc import Collection

from core.settings import BULK_QUEUE_SUFFIX
from tasks.app import app

logger = logging.getLogger(__name__)

ASK_S = 1.0  # how long the sweep waits for the workers' answers
# model -> the broker's time a sweep first found it unserved with live turns waiting, every sweep
# since finding it so: a model served again, or with nothing waiting, leaves it (review: a mark left
# from an outage weeks before made one missed answer fail a model's turns at once).
UNSERVED_SINCE = "mlchat:unserved-since"


def served_models() -> set[str] | None:
    """The models whose live queue (`gen.<model>`: a live turn's, never its bulk one's) some worker
    consumes now, as the workers answer within ASK_S; None when nothing is known: the broker cannot
    be asked, or no worker answered at all (none running, a sweeper on another broker, a serverless
    deployment: review, every model then counted unserved)."""
    try:
        answers = app.control.inspect(timeout=ASK_S).active_queues()
    except Exception:
        logger.warning("could not ask the workers which queues they consume", exc_info=True)
        return None
    if not answers:
        return None
    return {
        str(queue["name"]).removeprefix("gen.")
        for queues in answers.values()
        for queue in queues or ()
        if isinstance(queue, dict)
        and str(queue.get("name", "")).startswith("gen.")
        and not str(queue["name"]).endswith(BULK_QUEUE_SUFFIX)
    }


def unserved_for(
    waiting: Collection[str], served: Collection[str], renewed_within_s: float
) -> dict[str, float]:
    """Seconds each of the `waiting` models (live turns wait for it) not in `served` has been found
    unserved by the sweeps without a break, on the broker's clock (0 the first time). A mark no
    sweep renewed within `renewed_within_s` starts afresh (review: one left through a broker's
    outage, the sweeps meanwhile learning nothing, failed turns at the first answer missed after).
    Every other model's mark is dropped: one served, or with nothing waiting, starts afresh next time."""
    unserved = sorted(set(waiting) - set(served))
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        now = int(client.time()[0])
        marks = {_text(m): _text(v) for m, v in client.hgetall(UNSERVED_SINCE).items()}
        if stale := [m for m in marks if m not in unserved]:
            client.hdel(UNSERVED_SINCE, *stale)
        absent: dict[str, float] = {}
        for model in unserved:
            since, _, renewed = marks.get(model, "").partition(",")
            if not (since.isdigit() and renewed.isdigit()) or now - int(renewed) > renewed_within_s:
                since = str(now)
            client.hset(UNSERVED_SINCE, model, f"{since},{now}")
            absent[model] = max(0.0, float(now - int(since)))
        # No TTL: a Redis under a volatile-* policy evicts keys that have one, and each eviction
        # restarted the count, the turns of a model never served again never failed (review of
        # Redis losing state). A mark no sweep renewed in time starts afresh all the same (above).
        # PERSIST: an earlier version's sweeper set one, which HSET keeps.
        client.persist(UNSERVED_SINCE)
        return absent


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
