"""The completion-callback tasks (a batch's, a turn's): every worker consumes their queue; Celery retries
them with backoff, when the receiver failed and when the database did (the delivery reads the run and
records each try: a blip there must not drop a callback that a try was recorded for, as the sweep
looks again only at callbacks never tried). A retry after a POST that went through but could not be
recorded posts again: deliveries are at least once, and X-Mlchat-Delivery names each for the receiver
to drop a repeat."""

from __future__ import annotations

import uuid

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.settings import settings
from services.callbacks import CallbackFailed, deliver
from services.turn_callbacks import deliver_turn
from tasks.app import app

CALLBACK_QUEUE = "mlchat.callbacks"


@app.task(
    name="mlchat.deliver_batch_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    retry_backoff=2,  # 2 s, 4 s, 8 s … (with jitter), capped below
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
)
def deliver_batch_callback(run_id: str) -> None:
    deliver(uuid.UUID(run_id))


@app.task(
    name="mlchat.deliver_turn_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
)
def deliver_turn_callback(turn_id: str) -> None:
    deliver_turn(uuid.UUID(turn_id))
