"""What a worker does when its engine dies: report it, finish the flush in hand, exit non-zero.

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

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3


def stop_for_dead_engine(error: BaseException) -> None:
    """Mark the engine down for the health check and metrics, and stop the worker after this flush."""
    metrics.ENGINE_UP.set(0)
    if worker_state.should_stop in (None, False):
        logger.critical(
            "the engine died (%r): stopping this worker with exit code %d", error, EXIT_ENGINE_DEAD
        )
        worker_state.should_stop = EXIT_ENGINE_DEAD
