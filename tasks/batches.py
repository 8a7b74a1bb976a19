"""celery-batches' Batches with the broker-reconnect fix that came after its 0.11 release.

0.11 arms its interval-flush timer on the first buffered message and keeps a reference to it on the
task, which outlives the consumer. After a broker reconnect Celery builds a new consumer (a new
event loop and timer) and calls `Strategy()` again, but the old reference stops the timer from
being armed on the new loop: from then on only a full batch (`flush_every` messages) flushes, and a
partial batch waits forever (upstream issues #99 and #107, fixed by #108). Here `Strategy()` drops
the stale timer and, if messages are already buffered, arms a fresh one at once.
"""

from __future__ import annotations

from typing import Any

from celery_batches import Batches


class ReconnectSafeBatches(Batches):
    """Batches whose flush timer survives a broker reconnect."""

    abstract = True
    _tref: Any  # the flush timer entry (kombu's Entry), set by Batches

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        handler = super().Strategy(task, app, consumer)
        if not (self._buffer.empty() and self._pending.empty()):
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        return handler
