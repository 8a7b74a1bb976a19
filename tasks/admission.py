"""Bulk admission: the worker stops taking bulk messages from Redis while its engine is full.

The worker's prefetch is generous (live messages must always find a slot), so prefetch alone does
not bound bulk work. This gate counts the bulk turns a worker holds (received, not yet answered);
once they reach the engine's bulk capacity it cancels the worker's consumer of the bulk queue, and a
timer on the consumer's own loop re-adds it when answered turns bring the count back down. Live
messages are never gated: they keep flowing while the engine is full of bulk work, and run ahead of
it inside the engine (worker/engine_loop.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.worker import state as worker_state

from core.settings import BULK_QUEUE_SUFFIX, settings
from tasks.batches import ReconnectSafeBatches

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 0.1


def bulk_turns_in(body: Any) -> int:
    """How many bulk turns a decoded task message carries (0 for live or malformed ones)."""
    kwargs = body[1] if isinstance(body, tuple | list) and len(body) > 1 else None
    if not isinstance(kwargs, dict) or kwargs.get("lane") != "bulk":
        return 0
    ids = kwargs.get("turn_ids")
    return len(ids) if isinstance(ids, list) else 0


def deferred(headers: Any) -> bool:
    """Whether a task message waits for its `eta` (a turn sent again after a back-off): celery-batches
    holds it until then, and it is neither counted nor released by the bulk gate meanwhile."""
    return bool((headers or {}).get("eta"))


def live_turns_in(body: Any) -> int:
    """How many live turns a decoded task message carries (0 for bulk or malformed ones)."""
    kwargs = body[1] if isinstance(body, tuple | list) and len(body) > 1 else None
    if not isinstance(kwargs, dict) or kwargs.get("lane", "live") != "live":
        return 0
    ids = kwargs.get("turn_ids")
    return len(ids) if isinstance(ids, list) else 0


def announce_live(message: Any, body: Any) -> None:
    """Tell the engine loop that live turns are on their way (their message just arrived), so that it
    admits no new bulk request before they join (worker/engine_loop.py, expect_live). A message sent
    for later (a deferred turn) announces nothing."""
    from worker import engine as engine_module

    deferred = (getattr(message, "headers", None) or {}).get("eta")
    if deferred or not engine_module.get_loop.cache_info().currsize:
        return
    loop = engine_module.get_loop()
    for _ in range(live_turns_in(body)):
        loop.expect_live()


class BulkGate:
    """Counts held bulk turns and messages; pauses and resumes the consumer of the bulk queues around
    a capacity of each.

    Messages are counted because each flush holds a worker thread until its turns are answered: a
    bulk message counts from its arrival, and once a flush takes it, that flush's messages count as
    one until it ends (tasks/generate.py). Bounding that count bounds the threads bulk work can
    take, so a live flush finds a thread free (before: with the engine's bulk capacity in the
    hundreds of turns, bulk flushes arriving one message at a time could take every thread, and a
    live flush waited for one of them to finish).

    Every bulk queue the worker consumes is paused, not only its own model's: one added at run time
    (Celery's `add_consumer`, Flower's "add consumer") feeds the same engine.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0
        self.messages = 0  # bulk messages waiting for a flush, plus bulk flushes running (a thread each)
        self.capacity: int | None = None  # None: not attached to a consumer (no gating)
        self.message_capacity: int | None = None
        self.closed = False
        self.pauses = 0  # times the bulk queue was paused
        self.peak = 0  # most bulk turns held at once
        self._consumer: Any = None
        self._paused: set[str] = set()  # the bulk queues the gate stopped consuming
        self._timer: Any = None

    def attach(self, consumer: Any, capacity: int, message_capacity: int | None = None) -> None:
        """Called on the consumer's thread each time Celery (re)builds its consumer."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._consumer, self.capacity, self.closed = consumer, capacity, False
            self.message_capacity = message_capacity
            self._paused = set()
        self._timer = consumer.timer.call_repeatedly(CHECK_EVERY_S, self._maybe_reopen)
        logger.info(
            "bulk admission: up to %d bulk turns held by this worker, in %s bulk messages at most",
            capacity,
            "any number of" if message_capacity is None else message_capacity,
        )

    def received(self, turns: int) -> None:
        """A bulk message arrived (consumer thread): count it, and close the gate if full."""
        if not turns:
            return
        with self._lock:
            self._count(turns, 1)
            was_closed = self.closed
            full = self._full()
            if full and not was_closed:
                self.closed = True
                self.pauses += 1
        if full:  # closed already, too: a bulk queue added since (add_consumer) is paused as well
            self._set_consuming(False)

    def hold(self, turns: int, messages: int = 0) -> None:
        """Deferred bulk turns (in `messages` messages), now due, joined a flush (any thread):
        counted until it answers them, as received ones are; a later arrival closes the gate if
        this filled it."""
        if turns or messages:
            with self._lock:
                self._count(turns, messages)

    def admit_due(self, turns: int, messages: int) -> bool:
        """Deferred bulk turns now due (in `messages` messages), in a flush of no counted bulk
        message (any thread): counted, as `hold` counts them, if the gate has room; else False and
        nothing counted. Such a flush takes a thread of its own while its turns wait for the engine,
        and they arrive past the gate (held since their countdown began): enough of them at once took
        every thread of the pool, and a live flush waited behind bulk ones (review)."""
        with self._lock:
            if self._full():
                return False
            self._count(turns, messages)
            return True

    def _count(self, turns: int, messages: int) -> None:
        """Count turns and messages held (under the lock)."""
        self.held += turns
        self.messages += messages
        self.peak = max(self.peak, self.held)

    def _full(self) -> bool:
        """Whether the turns or the messages held reached their capacity (under the lock)."""
        if self.capacity is None:
            return False
        too_many = self.message_capacity is not None and self.messages >= self.message_capacity
        return self.held >= self.capacity or too_many

    def release(self, turns: int, messages: int = 0) -> None:
        """Bulk turns were answered or handed back, or a flush of `messages` bulk messages ended (any
        thread); the timer reopens the gate."""
        if turns or messages:
            with self._lock:
                self.held = max(0, self.held - turns)
                self.messages = max(0, self.messages - messages)

    @property
    def paused(self) -> frozenset[str]:
        """The bulk queues the gate stopped consuming and will consume again once it has room."""
        with self._lock:
            return frozenset(self._paused)

    def forget(self, queue: str) -> None:
        """An operator cancelled `queue` (tasks/consumer.py): reopening must not consume it again."""
        with self._lock:
            self._paused.discard(queue)

    def _maybe_reopen(self) -> None:
        """Consume the paused queues again once there is room; a resume that failed (a broker hiccup)
        leaves its queues paused, and the next check tries them again. Never while the worker stops
        (a warm shutdown sets should_stop to 0)."""
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            return
        with self._lock:
            room = self.capacity is not None and not self._full()
            reopen = room and (self.closed or bool(self._paused))
            if reopen:
                self.closed = False
        if reopen:
            self._set_consuming(True)

    def _set_consuming(self, on: bool) -> None:
        consumer = self._consumer
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return
        try:
            if on:
                known = consumer.app.amqp.queues
                with self._lock:
                    paused = sorted(self._paused)
                for name in paused:
                    if name in known and not task_consumer.consuming_from(name):
                        task_consumer.add_queue(known[name])
                        task_consumer.consume()
                    with self._lock:
                        self._paused.discard(name)  # only once it is consumed again
            else:
                for name in [q.name for q in task_consumer.queues if q.name.endswith(BULK_QUEUE_SUFFIX)]:
                    task_consumer.cancel_by_queue(name)
                    with self._lock:
                        self._paused.add(name)
        except Exception:  # a broker hiccup: a reconnect rebuilds the consumer and attaches again
            logger.warning("could not %s the bulk queue", "resume" if on else "pause", exc_info=True)


bulk_gate = BulkGate()


def bulk_capacity() -> int:
    """Bulk turns a worker may hold: what its engine admits at once, plus one message ready behind."""
    from worker import engine as engine_module

    inside = (
        engine_module.get_loop().max_inflight
        if engine_module.get_engine.cache_info().currsize
        else settings.max_inflight or DEFAULT_INFLIGHT
    )
    return inside + settings.batch_size


DEFAULT_INFLIGHT = 64  # before the engine is loaded (its KV cache sizes the real figure)


def callback_slots(threads: int) -> int:
    """Callback deliveries at once in a worker of `threads` threads (tasks/callbacks.py):
    MLCHAT_CALLBACK_CONCURRENCY, at most half its threads (they share them with generation
    flushes), at least one."""
    return max(1, min(settings.callback_concurrency, threads // 2))


def bulk_message_capacity(threads: int) -> int:
    """Bulk messages waiting plus bulk flushes running a worker of `threads` threads may have: its
    threads but a quarter (at least one) kept for live flushes, and those its memory jobs and
    callback deliveries may hold besides (a receiver that hangs holds its thread 10 s a try). A GPU
    engine that admits more bulk turns than those flushes carry (MLCHAT_FLUSH_EVERY messages of
    MLCHAT_BATCH_SIZE turns each at most) needs more threads to be kept full."""
    others = settings.memory_jobs_per_worker + callback_slots(threads)
    return max(1, threads - max(1, threads // 4) - others)


def pool_threads(consumer: Any) -> int:
    """The threads the worker's pool really has: `--concurrency` given to `mlchat worker` overrides
    MLCHAT_WORKER_THREADS, and the gate must count against the pool that runs the flushes."""
    limit = getattr(getattr(consumer, "pool", None), "limit", None)
    return limit if isinstance(limit, int) and limit > 0 else settings.worker_threads


class BulkGatedBatches(ReconnectSafeBatches):
    """celery-batches' task whose worker pauses its bulk queue while the engine is full of bulk work."""

    abstract = True

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        handler = super().Strategy(task, app, consumer)
        threads = pool_threads(consumer)
        capacity, messages = bulk_capacity(), bulk_message_capacity(threads)
        bulk_gate.attach(consumer, capacity, messages)
        carried = messages * settings.flush_every * settings.batch_size
        if capacity > carried:
            logger.warning(
                "bulk admission: %d bulk turns fit in the engine but %d bulk flushes carry %d at most; "
                "raise MLCHAT_WORKER_THREADS (the pool has %d threads) to keep it full",
                capacity,
                messages,
                carried,
                threads,
            )
        return gated(handler, bulk_gate)


def gated(handler: Any, gate: BulkGate) -> Any:
    """celery-batches' message handler, counting each bulk message in `gate` as it arrives. A message
    the handler refuses (a malformed header: Celery rejects it) never reaches a flush, which is what
    releases the count, so it is released here."""

    def counted(message: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        decoded = body if body is not None else message.decode()
        # A deferred message would hold the gate closed for its whole countdown (up to half the
        # visibility timeout) with the engine idle: counted only once due, by its flush (hold).
        turns = 0 if deferred(getattr(message, "headers", None)) else bulk_turns_in(decoded)
        gate.received(turns)
        try:
            announce_live(message, decoded)
        except Exception:  # an announcement only speeds a live turn up: it never loses a message
            logger.warning("could not announce a live message to the engine loop", exc_info=True)
        try:
            handler(message, body, *args, **kwargs)
        except BaseException:
            gate.release(turns, 1 if turns else 0)
            raise

    return counted
