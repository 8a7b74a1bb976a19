"""celery-batches' Batches with the broker-reconnect fix that came after its 0.11 release, and
Celery's prefetch accounting for messages sent for later.

0.11 arms its interval-flush timer on the first buffered message and keeps a reference to it on the
task, which outlives the consumer. After a broker reconnect Celery builds a new consumer (a new
event loop and timer) and calls `Strategy()` again, but the old reference stops the timer from
being armed on the new loop: from then on only a full batch (`flush_every` messages) flushes, and a
partial batch waits forever (upstream issues #99 and #107, fixed by #108). Here `Strategy()` drops
the stale timer and, if messages are already buffered, arms a fresh one at once.

A message with an ETA (a turn sent again after a back-off, or to look again when another worker's
lease lapses) waits unacked in celery-batches' buffer until due, and kombu counts it against the
worker's prefetch. Celery's own strategy raises the prefetch by one for each such message until it
runs; 0.11 does not, so a few dozen of them stopped the worker taking anything, live messages
included, until they came due. Here each raises it on arrival and lowers it once flushed.

Celery makes a countdown an ETA on the sender's clock, kept by the receiver's: a sender minutes ahead
made the receiver hold a 0.1 s deferral for minutes (clocks review). A message whose sender wrote its
countdown (COUNTDOWN_HEADER) is held no longer than that countdown from its arrival.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_batches import Batches

COUNTDOWN_HEADER = "mlchat_countdown"  # seconds, as the sender meant them


def held_no_longer_than_its_countdown(headers: dict[str, Any]) -> None:
    """The message's ETA, brought back to its countdown from now where the sender's clock put it
    later (the sender ahead of this host); one earlier is kept (the message may have waited)."""
    countdown, eta = headers.get(COUNTDOWN_HEADER), headers.get("eta")
    if not isinstance(countdown, int | float) or not isinstance(eta, str):
        return
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    latest = datetime.now(UTC) + timedelta(seconds=max(float(countdown), 0.0))
    if due > latest:
        headers["eta"] = latest.isoformat()


class ReconnectSafeBatches(Batches):
    """Batches whose flush timer survives a broker reconnect."""

    abstract = True
    _tref: Any  # the flush timer entry (kombu's Entry), set by Batches
    # Messages with an ETA that raised a consumer's prefetch: {delivery tag: [(that consumer's QoS,
    # the consumer)]}, once per delivery (a restored message keeps its tag).
    _countdowns: dict[Any, list[tuple[Any, Any]]] = {}
    _countdowns_lock = threading.Lock()

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        handler = super().Strategy(task, app, consumer)
        if not (self._buffer.empty() and self._pending.empty()):
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        return self._counting_countdowns(handler, consumer)

    def _counting_countdowns(self, handler: Any, consumer: Any) -> Any:
        def counted(message: Any, body: Any, *args: Any, **kwargs: Any) -> None:
            tag = getattr(message, "delivery_tag", None)
            qos = consumer.qos  # set after the strategies are built, and anew on each reconnect
            headers = getattr(message, "headers", None) or {}
            held_no_longer_than_its_countdown(headers)
            eta = headers.get("eta")
            later = tag is not None and qos is not None and bool(eta)
            if later:
                qos.increment_eventually()
                with self._countdowns_lock:
                    self._countdowns.setdefault(tag, []).append((qos, consumer))
            try:
                handler(message, body, *args, **kwargs)
            except BaseException:
                if later:
                    self._release_countdowns([tag])
                raise

        return counted

    def flush(self, requests: Collection[Any]) -> Any:
        self._release_countdowns(getattr(getattr(r, "message", None), "delivery_tag", None) for r in requests)
        return super().flush(requests)

    def _release_countdowns(self, tags: Any) -> None:
        released = []
        with self._countdowns_lock:
            for tag in tags:
                held = self._countdowns.get(tag)
                if held:
                    released.append(held.pop())
                    if not held:
                        del self._countdowns[tag]
        for qos, consumer in released:
            # Never under the consumer's prefetch as it stands now (a reconnect lowers it, and Celery
            # restores it later, wiping out the raises).
            if qos.value > int(getattr(consumer, "initial_prefetch_count", 0) or 0):
                qos.decrement_eventually()
