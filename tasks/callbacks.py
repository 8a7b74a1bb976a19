"""The completion-callback tasks (a batch's, a turn's): every worker consumes their queue; Celery retries
them with backoff, when the receiver failed and when the database did (the delivery reads the run and
records each try: a blip there must not drop a callback that a try was recorded for, as the sweep
looks again only at callbacks never tried). A retry after a POST that went through but could not be
recorded posts again: deliveries are at least once, and X-Mlchat-Delivery names each for the receiver
to drop a repeat.

Callbacks run in the worker threads that also run generation flushes, and their queue is read first;
a worker delivers at most MLCHAT_CALLBACK_CONCURRENCY at once, so receivers that hang (a host that
accepts and never answers, a resolver that stalls) cannot take every thread from live turns. A
delivery that finds no slot is sent back to the queue with a short countdown, its try not counted.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.settings import settings
from services.callbacks import CallbackFailed, deliver
from services.turn_callbacks import deliver_turn
from tasks.app import app

CALLBACK_QUEUE = "mlchat.callbacks"

_SLOTS = threading.BoundedSemaphore(settings.callback_concurrency)
SLOT_WAIT_S = 2.0  # a delivery that found no slot is looked at again after this (up to twice it)


def _in_a_slot(task: Any, deliver_one: Callable[[uuid.UUID], object], target: str) -> None:
    """Deliver within one of the process's slots, or send the task back for later, its try count
    as it was (a full house is not the receiver's failure)."""
    if not _SLOTS.acquire(blocking=False):
        _later(task)
        return
    try:
        deliver_one(uuid.UUID(target))
    finally:
        _SLOTS.release()


def _later(task: Any) -> None:
    countdown = SLOT_WAIT_S * (1.0 + random.random())
    task.signature_from_request(task.request, countdown=countdown, retries=task.request.retries).apply_async()


@app.task(
    name="mlchat.deliver_batch_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    retry_backoff=2,  # 2 s, 4 s, 8 s … (with jitter), capped below
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
    bind=True,
)
def deliver_batch_callback(self: Any, run_id: str) -> None:
    _in_a_slot(self, deliver, run_id)


@app.task(
    name="mlchat.deliver_turn_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
    bind=True,
)
def deliver_turn_callback(self: Any, turn_id: str) -> None:
    _in_a_slot(self, deliver_turn, turn_id)
