"""The worker's side: each streamed turn's new text, XADDed to the turn's stream by one thread.

The engine loop only appends to a bounded in-process queue (never a Redis call, never a block);
this thread drains it in pipelined rounds. Nothing is dropped while Redis answers and the queue has
room. A round Redis did not take because it was away (unreachable, hung, a failover's READONLY) is
kept and tried again after a pause of a few seconds, then what was queued meanwhile, in order, so a
reader resumes where it was once Redis is back (its next delta's number follows the last it
showed). Events are dropped (logged, counted in `mlchat_stream_events_dropped`) when the queue is
full (the outage lasted that long) or Redis refused the round itself; the stored turn stays the
truth, which every reader falls back to. A retried send may reach Redis twice: each delta's `seq`
lets readers drop the repeat. `flush` waits for what was queued before it to be sent or dropped:
a round held through an outage is neither.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import BusyLoadingError, ConnectionError, ReadOnlyError, TimeoutError

from core import metrics
from core.settings import settings
from streaming.events import DELTA, END, redis_url, stream_key

logger = logging.getLogger(__name__)

_ROUND = 512  # events sent in one pipelined round trip at most
_TRIES = 3
_PAUSE_S = 5.0  # after a held round, Redis is not asked for this long (events wait in the queue)
_SOCKET_TIMEOUT_S = 2.0  # a hung Redis fails the send instead of holding the thread
_SEQ_TURNS = 10_000  # turns whose delta numbers are kept (a turn's `end` forgets its own)
# How long a stream is kept after its end: a reader that resumes later reads the stored turn, which
# the end says is committed (an hour of every ended reply's deltas would be most of Redis's memory).
ENDED_TTL_S = 300
_SENT, _HELD, _DROPPED = "sent", "held", "dropped"  # what became of a round
# Redis away or not writing for now (a restart, a failover): the round waits for it, not dropped.
_OUT_FOR_NOW = (ConnectionError, TimeoutError, ReadOnlyError, BusyLoadingError, OSError)


class Publisher:
    """One background thread that sends queued stream events to Redis, in order."""

    def __init__(self, client: Any, *, max_queued: int | None = None) -> None:
        self._client = client
        size = settings.stream_queue_max if max_queued is None else max_queued
        self._queue: queue.Queue[tuple[str, dict[str, str]] | threading.Event] = queue.Queue(size)
        self._paused_until = 0.0
        self._failing = False  # the last round Redis was asked to take failed
        self._dropped = 0  # since the last warning
        self._seq_lock = threading.Lock()
        # turn -> {claim: its last seq}: two claims of a turn in one process (a lapsed one still in
        # the engine, the new one streaming) each number their own deltas.
        self._seqs: dict[uuid.UUID, dict[uuid.UUID, int]] = {}
        self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)
        self._thread.start()

    def delta(self, turn_id: uuid.UUID, claim: uuid.UUID, text: str, rank: int = 0) -> None:
        """Queue new text of a turn's reply, written under `claim` (never blocks), numbered within the
        claim and stamped with the wall-clock time the engine produced it (readers measure the
        delivery cost against it). `rank`: the claim's rank (turns.claims), higher for a claim that took the
        turn over (a lapsed claim's late text never replaces the newer one's)."""
        fields = {
            "kind": DELTA,
            "text": text,
            "claim": str(claim),
            "rank": str(rank),
            "seq": str(self._next_seq(turn_id, claim)),
            "t": repr(time.time()),
        }
        self._put(stream_key(turn_id), fields)

    def end(self, turn_id: uuid.UUID) -> None:
        """Queue the marker that the turn's outcome is committed (call it after the commit)."""
        with self._seq_lock:
            self._seqs.pop(turn_id, None)
        self._put(stream_key(turn_id), {"kind": END})

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is sent or dropped (tests, shutdown); False on timeout."""
        sent = threading.Event()
        try:
            self._queue.put(sent, timeout=timeout)
        except queue.Full:
            return False
        return sent.wait(timeout)

    @property
    def dropped(self) -> int:
        """Events dropped since the last warning about them."""
        return self._dropped

    def _next_seq(self, turn_id: uuid.UUID, claim: uuid.UUID) -> int:
        with self._seq_lock:
            if turn_id not in self._seqs and len(self._seqs) >= _SEQ_TURNS:
                del self._seqs[next(iter(self._seqs))]  # a turn handed back and finished elsewhere
            claims = self._seqs.setdefault(turn_id, {})
            claims[claim] = seq = claims.get(claim, 0) + 1
            return seq

    def _put(self, key: str, fields: dict[str, str]) -> None:
        try:
            self._queue.put_nowait((key, fields))
        except queue.Full:
            self._drop(1, "queue_full")

    def _drop(self, n: int, why: str) -> None:
        metrics.STREAM_EVENTS_DROPPED.labels(why).inc(n)
        first = self._dropped == 0
        self._dropped += n
        if first:
            logger.warning("stream events dropped (%s); readers fall back to the stored turn", why)

    def _run(self) -> None:
        held: list[tuple[str, dict[str, str]]] = []  # a round Redis did not take, sent again first
        flushes: list[threading.Event] = []  # set once every event queued before them was sent or dropped
        while True:
            if held:  # wait out the pause; what comes meanwhile waits in the bounded queue
                time.sleep(max(self._paused_until - time.monotonic(), 0.0))
            batch = [] if held else [self._queue.get()]
            while len(held) + len(batch) < _ROUND:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = held + [item for item in batch if not isinstance(item, threading.Event)]
            flushes += [item for item in batch if isinstance(item, threading.Event)]
            held = []
            if events:
                outcome = self._send(events)
                if outcome == _HELD:
                    held = events
                elif outcome == _DROPPED:
                    self._drop(len(events), "redis_error")
                elif self._failing or self._dropped:
                    logger.warning("stream events sent again; %d were dropped", self._dropped)
                    self._failing, self._dropped = False, 0
            if not held:
                for flushed in flushes:
                    flushed.set()
                flushes = []

    def _send(self, events: list[tuple[str, dict[str, str]]]) -> str:
        """_SENT; _HELD when Redis could not be reached or would not write (a restart, a failover's
        READONLY: the round is tried again after the pause); _DROPPED when it refused the round
        itself (a wrong-typed key, say: held, it would stall every stream for good)."""
        for attempt in range(_TRIES):
            try:
                # MULTI … EXEC: a round cut off mid-send applies nothing (a non-transactional pipeline
                # ran its first chunk of XADDs, creating the stream, and never reached its EXPIRE).
                pipe = self._client.pipeline(transaction=True)
                for key, fields in events:
                    pipe.xadd(key, fields, maxlen=settings.stream_max_len, approximate=True)
                last = {key: fields["kind"] for key, fields in events}  # each stream's newest event
                for key, kind in last.items():
                    ended = kind == END
                    pipe.expire(
                        key, min(ENDED_TTL_S, settings.stream_ttl_s) if ended else settings.stream_ttl_s
                    )
                pipe.execute()
                return _SENT
            except Exception as exc:
                if not isinstance(exc, _OUT_FOR_NOW):  # refused (run, maybe in part, at EXEC): not again
                    logger.warning("Redis refused a round of stream events", exc_info=True)
                    return _DROPPED
                if isinstance(exc, ReadOnlyError):
                    # A failover demoted the server these connections reach, and the name now points
                    # at the new primary: redis-py keeps a connection that answers READONLY, so drop
                    # them all; the next try connects anew.
                    self._client.connection_pool.disconnect()
                if attempt == _TRIES - 1:
                    if not self._failing:
                        logger.warning("Redis did not take stream events", exc_info=True)
                    self._failing = True
                    self._paused_until = time.monotonic() + _PAUSE_S
                    return _HELD
                time.sleep(0.1 * 2**attempt)
        return _HELD


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def _start_afresh() -> None:
    """A forked child has the parent's publisher without its thread: what it queued was never sent."""
    global _publisher, _publisher_lock
    _publisher, _publisher_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_start_afresh)


def publisher() -> Publisher:
    """This process's publisher (started on first use, once however many threads ask at once)."""
    global _publisher
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                import redis

                client = redis.Redis.from_url(
                    redis_url(), socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_SOCKET_TIMEOUT_S
                )
                _publisher = Publisher(client)
    return _publisher


def flush_if_started(timeout: float) -> bool:
    """Send what this process's publisher holds, waiting at most `timeout` (a stopping worker)."""
    return _publisher is None or _publisher.flush(timeout)


def text_hook(turn_id: uuid.UUID, claim: uuid.UUID, rank: int = 0) -> Callable[[str], None]:
    """What the engine loop calls with each new piece of the turn's reply."""
    sink = publisher()
    return lambda text: sink.delta(turn_id, claim, text, rank)
