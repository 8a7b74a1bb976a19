"""The Celery application: Redis broker, JSON messages, no result backend (Postgres holds results)."""

from __future__ import annotations

import socket

from celery import Celery

from core.services import broker_url
from core.settings import settings
from tasks.broker import transport_for

PREFETCH_PER_THREAD = 4
# TCP keepalive probes: after 60 s idle, every 10 s, 3 unanswered close it (where the OS has them).
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}

# Not the thread's current app: a game backend enqueueing through the Python API keeps its own Celery
# app's `shared_task`s (they were sent to mlchat's broker and queue and dropped there; review). A
# worker makes it current itself when it starts.
app = Celery(
    "mlchat",
    broker=broker_url(),
    include=["tasks.generate", "tasks.callbacks", "tasks.memory"],
    set_as_current=False,
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    # Unacked messages a worker may hold: one per thread by default. `python -m worker` (and the fleet
    # simulator) pass PREFETCH_PER_THREAD instead, so live messages find room in a worker full of
    # bulk work (tasks/admission.py bounds the bulk ones).
    worker_prefetch_multiplier=1,
    # "priority": poll the worker's queues in the order given (live before bulk), not round robin.
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        # A worker looks for unacked messages past the visibility timeout (a dead worker's) every
        # interval x 10 s (kombu >= 5.7; older kombu always scans every 100 s): kombu's default 10 s
        # interval made a dead worker's turns wait up to 100 s longer than the timeout.
        "unacked_restore_interval": 1,
        "queue_order_strategy": "priority",
        # Without these a command on a connection the broker left half-open (failover, NAT) waits
        # for ever: a producer's publish, the sweeper's reads (the consumer's BRPOP is watched by
        # kombu's own health check instead).
        "socket_timeout": settings.broker_socket_timeout_s,
        "socket_connect_timeout": min(settings.broker_socket_timeout_s, 10.0),
        # Probes after a minute idle (the OS waits two hours by default, past any NAT's idle timeout).
        "socket_keepalive": True,
        "socket_keepalive_options": _KEEPALIVE,
    },
    # kombu's Redis transport, with one redis-py client per channel instead of one per publish.
    broker_transport=transport_for(broker_url()),
    broker_connection_retry_on_startup=True,
    task_default_queue=settings.queue,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
    # Celery's consumer, which also tells the bulk gate of a queue an operator cancels.
    worker_consumer="tasks.consumer:GatedConsumer",
)


def within_visibility(countdown: float) -> float:
    """A countdown a worker holds its message unacked for, at most half the visibility timeout: past
    it Redis hands the message to another worker as well, and each copy sends its own again."""
    return min(countdown, settings.visibility_timeout / 2)
