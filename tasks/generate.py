"""The batched generation task: celery-batches buffers turn messages and hands them over as one list."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from celery_batches import Batches

from core.settings import Lane, queue_for_model, settings
from tasks.app import app

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.generate_turns"


@app.task(
    base=Batches,
    name=TASK_NAME,
    flush_every=settings.batch_size,
    flush_interval=settings.flush_interval,
    acks_late=True,
    ignore_result=True,
)
def generate_turns(requests: list[Any]) -> None:
    """Answer a batch of turns. Messages carry only turn ids; the turn rows hold everything else."""
    from worker.pipeline import process_batch  # the engine lives on worker machines only

    turn_ids = list(dict.fromkeys(uuid.UUID(r.kwargs["turn_id"]) for r in requests))
    lane_of = {r.kwargs["turn_id"]: r.kwargs.get("lane", "live") for r in requests}
    model = requests[0].kwargs.get("model", settings.model)
    try:
        report = process_batch(turn_ids)
    except Exception:
        # celery-batches acks every message of a batch even when the task raises, so a batch that
        # dies mid-way (the database dropped, say) must hand its turns back itself. Claiming is
        # idempotent: turns already stored are skipped when they come round again.
        logger.exception(
            "batch of %d turns failed; sending them again in %.1f s",
            len(turn_ids),
            settings.batch_retry_delay,
        )
        again, countdown = turn_ids, settings.batch_retry_delay
    else:
        again, countdown = [*report.retry, *report.deferred], settings.flush_interval
    # Re-send before this batch's messages are acked on return, so a crash in between loses nothing.
    for lane in ("live", "bulk"):
        dispatch(
            [t for t in again if lane_of.get(str(t), "live") == lane],
            model=model,
            lane=lane,
            countdown=countdown,
        )


def dispatch(
    turn_ids: Iterable[uuid.UUID], *, model: str, lane: Lane = "live", countdown: float | None = None
) -> None:
    """Send one message per turn to its model's queue for that lane."""
    queue = queue_for_model(model, lane)
    with app.producer_or_acquire() as producer:
        for turn_id in turn_ids:
            generate_turns.apply_async(
                kwargs={"turn_id": str(turn_id), "model": model, "lane": lane},
                queue=queue,
                countdown=countdown,
                producer=producer,
            )
