"""The Celery application: Redis broker, JSON messages, no result backend (Postgres holds results)."""

from __future__ import annotations

from celery import Celery

from core.services import broker_url
from core.settings import settings

app = Celery("mlchat", broker=broker_url(), include=["tasks.generate"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    # One message per batch slot: the solo worker prefetches exactly what the next batch can take.
    worker_prefetch_multiplier=settings.batch_size,
    # "priority": poll the worker's queues in the order given (live before bulk), not round robin.
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
    },
    broker_connection_retry_on_startup=True,
    task_default_queue=settings.queue,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
)
