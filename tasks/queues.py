"""Queue depth on the broker, read without consuming (for yielding to live turns and for metrics)."""

from __future__ import annotations

from kombu.exceptions import ChannelError

from core.settings import Lane, queue_for_model
from tasks.app import app


def queue_depth(model: str, lane: Lane = "live") -> int:
    """Messages waiting in a model's lane queue; 0 when the queue does not exist (Redis drops empty lists)."""
    with app.pool.acquire(block=True) as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=queue_for_model(model, lane), passive=True)
            return int(declared.message_count)
        except ChannelError:
            return 0
