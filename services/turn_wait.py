"""Waiting for a turn to finish by re-reading it: the long poll, non-streaming chat completions, and a
stream reader that has everything but the outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from services.producer import TurnView

FIRST_POLL_S = 0.1  # a short turn answers quickly...
MAX_POLL_S = 1.0  # ...and a long wait costs a read a second, not ten


async def await_finished(read: Callable[[], Awaitable[TurnView]], wait_s: float) -> TurnView:
    """The turn once it is finished, or as it stands after `wait_s` seconds; re-read 0.1 s after the
    first read, the interval doubling up to 1 s."""
    deadline = time.monotonic() + wait_s
    interval = FIRST_POLL_S
    while True:
        view = await read()
        left = deadline - time.monotonic()
        if view.finished or left <= 0:
            return view
        await asyncio.sleep(min(interval, left))
        interval = min(interval * 2, MAX_POLL_S)
