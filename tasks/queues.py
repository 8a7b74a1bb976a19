"""Queue depth on the broker, read without consuming (for yielding to live turns and for metrics)."""

from __future__ import annotations

from kombu.exceptions import ChannelError

from core.settings import Lane, queue_for_model
from tasks.app import app


def queue_depth(model: str, lane: Lane = "live") -> int:
    """Messages waiting in a model's lane queue; 0 when the queue does not exist (Redis drops empty lists)."""
    # Its own short connection: the producer pool can be fully checked out by a busy worker, and a
    # metrics scrape must never wait on it.
    with app.connection_for_read() as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=queue_for_model(model, lane), passive=True)
            return int(declared.message_count)
        except ChannelError:
            return 0
