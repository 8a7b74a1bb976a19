"""What a worker does when its engine dies: report it, finish the flush in hand, exit non-zero;
and what it sends before it stops (the stream events still queued).

A dead engine core cannot come back inside this process, and a worker that stays up would keep
taking turns only to fail them. So the flush that saw the death hands its turns back (without
charging an attempt), and the worker asks Celery for a warm shutdown with exit code
EXIT_ENGINE_DEAD: prefetched messages go back to the queue as the consumer closes, and the
supervisor (compose `restart:`, systemd, Kubernetes) starts a fresh worker with a fresh engine.
"""

from __future__ import annotations

import logging

from celery.worker import state as worker_state

from core import metrics
from streaming.publisher import flush_if_started

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3
EXIT_EMBEDDER_MOVED = 4  # the stored vectors now come from another embedder (`mlchat reembed`)
_STREAM_FLUSH_S = 5.0  # a stopping worker's wait for its unsent stream events (Redis may be away)


def stop_for_dead_engine(error: BaseException) -> None:
    """Mark the engine down for the health check and metrics, and stop the worker after this flush."""
    metrics.ENGINE_UP.set(0)
    if worker_state.should_stop is None or worker_state.should_stop is False:  # a warm shutdown's 0 stays
        logger.critical(
            "the engine died (%r): stopping this worker with exit code %d", error, EXIT_ENGINE_DEAD
        )
        worker_state.should_stop = EXIT_ENGINE_DEAD


def stop_for_moved_embedder(why: str) -> None:
    """Stop the worker after this flush: the stored vectors are another embedder's now, so its
    retrieval finds no similar lines and its vectors are not stored; a restart with the new
    MLCHAT_EMBEDDER serves again (a restart with the old one is refused at start-up)."""
    if worker_state.should_stop is None or worker_state.should_stop is False:
        logger.critical(
            "%s: stopping this worker with exit code %d; restart it with that MLCHAT_EMBEDDER",
            why,
            EXIT_EMBEDDER_MOVED,
        )
        worker_state.should_stop = EXIT_EMBEDDER_MOVED


def flush_stream_events(**_: object) -> None:
    """Send the stream events still queued before the worker exits, waiting a bounded time."""
    if not flush_if_started(_STREAM_FLUSH_S):
        logger.warning("stream events still unsent after %.0f s at shutdown: dropped", _STREAM_FLUSH_S)
