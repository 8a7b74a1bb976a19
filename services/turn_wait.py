"""Waiting for a turn to finish by re-reading it: the long poll, non-streaming chat completions, and a
stream reader that has everything but the outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from services.producer import TurnView

FIRST_POLL_S = 0.1  # a short turn answers quickly...
MAX_POLL_S = 1.0  # ...and a long wait costs a read a second, not ten


async def await_finished(
    read: Callable[[], Awaitable[TurnView]],
    wait_s: float,
    *,
    read_again_after: Callable[[BaseException], bool] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TurnView:
    """The turn once it is finished, or as it stands after `wait_s` seconds, or as soon as `stop()`
    holds (the server shutting down); re-read 0.1 s after the first read, the interval doubling up
    to 1 s. A read that raises an error `read_again_after` accepts (a database blip) is read again
    until the deadline or the stop, which then raise it."""
    deadline = time.monotonic() + wait_s
    interval = FIRST_POLL_S
    while True:
        try:
            view: TurnView | None = await read()
        except Exception as exc:
            stopping = stop is not None and stop()
            if (
                read_again_after is None
                or not read_again_after(exc)
                or time.monotonic() >= deadline
                or stopping
            ):
                raise
            view = None
        left = deadline - time.monotonic()
        if view is not None and (view.finished or left <= 0 or (stop is not None and stop())):
            return view
        await asyncio.sleep(max(min(interval, left), 0))
        interval = min(interval * 2, MAX_POLL_S)
