"""A message said at most once a while in a process, however often its cause comes round: an outage
that fails every batch a second is one log line every half minute, with how many it stood for, not a
traceback a batch (review: about a thousand lines a second from a 16-thread worker)."""

from __future__ import annotations

import threading
import time


class NowAndThen:
    """`due()` is the number of times it was asked since it last let one through (one or more) when
    `seconds` have passed since then, else None (counted)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def due(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            self._held += 1
            if self._last is not None and now - self._last < self.seconds:
                return None
            self._last, held, self._held = now, self._held, 0
            return held
