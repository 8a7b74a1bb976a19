"""The worker's side: each streamed turn's new text, XADDed to the turn's stream by one thread.

The engine loop only appends to an unbounded in-process queue (never a Redis call, never a block);
this thread drains it in pipelined rounds. Nothing is dropped while Redis answers: the queue holds
what the engine wrote until it is sent. When Redis is unreachable, events are dropped after a few
retries and logged; the stored turn stays the truth, which every reader falls back to.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from core.settings import settings
from streaming.events import DELTA, END, redis_url, stream_key

logger = logging.getLogger(__name__)

_ROUND = 512  # events sent in one pipelined round trip at most
_TRIES = 5


class Publisher:
    """One background thread that sends queued stream events to Redis, in order."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._queue: queue.SimpleQueue[tuple[str, dict[str, str]] | threading.Event] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)
        self._thread.start()

    def delta(self, turn_id: uuid.UUID, claim: uuid.UUID, text: str) -> None:
        """Queue new text of a turn's reply, written under `claim` (never blocks), stamped with the
        wall-clock time the engine produced it (readers measure the delivery cost against it)."""
        fields = {"kind": DELTA, "text": text, "claim": str(claim), "t": repr(time.time())}
        self._queue.put((stream_key(turn_id), fields))

    def end(self, turn_id: uuid.UUID) -> None:
        """Queue the marker that the turn's outcome is committed (call it after the commit)."""
        self._queue.put((stream_key(turn_id), {"kind": END}))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is sent (tests, shutdown); False on timeout."""
        sent = threading.Event()
        self._queue.put(sent)
        return sent.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _ROUND:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [item for item in batch if not isinstance(item, threading.Event)]
            if events:
                self._send(events)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()

    def _send(self, events: list[tuple[str, dict[str, str]]]) -> None:
        for attempt in range(_TRIES):
            try:
                pipe = self._client.pipeline(transaction=False)
                for key, fields in events:
                    pipe.xadd(key, fields, maxlen=settings.stream_max_len, approximate=True)
                for key in {k for k, _ in events}:
                    pipe.expire(key, settings.stream_ttl_s)
                pipe.execute()
                return
            except Exception:
                if attempt == _TRIES - 1:
                    logger.warning("stream events dropped: Redis did not take them", exc_info=True)
                    return
                time.sleep(0.1 * 2**attempt)


@cache
def publisher() -> Publisher:
    """This process's publisher (started on first use)."""
    import redis

    return Publisher(redis.Redis.from_url(redis_url()))


def text_hook(turn_id: uuid.UUID, claim: uuid.UUID) -> Callable[[str], None]:
    """What the engine loop calls with each new piece of the turn's reply."""
    sink = publisher()
    return lambda text: sink.delta(turn_id, claim, text)
