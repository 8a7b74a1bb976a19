"""The batched generation task: celery-batches buffers turn messages and hands them over as one list.

A live message carries one turn id; a bulk message carries up to a batch of them, so a 100,000-line
run is ~100,000 / batch_size messages. The task answers what it was handed in chunks of
`batch_size` turns and, between chunks, hands the rest back to the queue if a live turn is waiting,
so a live turn waits at most for the chunk in hand.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from celery_batches import Batches

from core.settings import Lane, queue_for_model, settings
from tasks.app import app
from tasks.events import TurnEvents
from tasks.queues import queue_depth

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.generate_turns"

Pending = tuple[uuid.UUID, Lane]


@app.task(
    base=Batches,
    name=TASK_NAME,
    flush_every=settings.batch_size,
    flush_interval=settings.flush_interval,
    acks_late=True,
    ignore_result=True,
)
def generate_turns(requests: list[Any]) -> None:
    """Answer the turns of the buffered messages. Messages carry only ids; the turn rows hold the rest."""
    model = requests[0].kwargs.get("model", settings.model)
    pending = _pending_turns(requests)
    with TurnEvents(requests[0].hostname) as events:
        events.received(pending, model)
        resend = _answer(pending, model, events)
    # Re-send before this flush's messages are acked on return, so a crash in between loses nothing.
    for turns, countdown in resend:
        for lane in ("live", "bulk"):
            ids = [t for t, t_lane in turns if t_lane == lane]
            dispatch(ids, model=model, lane=lane, countdown=countdown)


def _answer(
    pending: list[Pending], model: str, events: TurnEvents
) -> list[tuple[list[Pending], float | None]]:
    """Answer the flush's turns a batch at a time; returns what to send again, with its countdown."""
    from worker.pipeline import process_batch  # the engine lives on worker machines only

    resend: list[tuple[list[Pending], float | None]] = []
    for start in range(0, len(pending), settings.batch_size):
        chunk, rest = pending[start : start + settings.batch_size], pending[start:]
        if start and queue_depth(model, "live"):
            resend.append((rest, None))
            break
        lane_of = dict(chunk)
        events.started(turn_id for turn_id, _ in chunk)
        try:
            report = process_batch([turn_id for turn_id, _ in chunk])
        except Exception:
            # celery-batches acks every message of a flush even when the task raises, so a batch
            # that dies mid-way (the database dropped, say) hands its turns back itself. Claiming is
            # idempotent: turns already stored are skipped when they come round again.
            logger.exception(
                "batch of %d turns failed; sending %d turns again in %.1f s",
                len(chunk),
                len(rest),
                settings.batch_retry_delay,
            )
            resend.append((rest, settings.batch_retry_delay))
            events.finished([], {}, (turn_id for turn_id, _ in rest))
            break
        again = [*report.retry, *report.deferred]
        events.finished(report.done, report.failed, again)
        resend.append(([(t, lane_of[t]) for t in again], settings.flush_interval))
    return resend


def _pending_turns(requests: Sequence[Any]) -> list[Pending]:
    """Every turn id of the flush, once, live lane first, otherwise in arrival order."""
    seen: dict[uuid.UUID, Lane] = {}
    for request in requests:
        lane = request.kwargs.get("lane", "live")
        for turn_id in request.kwargs["turn_ids"]:
            seen.setdefault(uuid.UUID(turn_id), lane)
    return sorted(seen.items(), key=lambda item: item[1] != "live")


def dispatch(
    turn_ids: Iterable[uuid.UUID], *, model: str, lane: Lane = "live", countdown: float | None = None
) -> None:
    """Send turns to their model's queue for that lane: one per live message, a batch per bulk one."""
    ids = [str(turn_id) for turn_id in turn_ids]
    per_message = 1 if lane == "live" else settings.batch_size
    queue = queue_for_model(model, lane)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(ids), per_message):
            generate_turns.apply_async(
                kwargs={"turn_ids": ids[start : start + per_message], "model": model, "lane": lane},
                queue=queue,
                countdown=countdown,
                producer=producer,
            )
