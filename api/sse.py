"""The server-sent-event responses of the API's streams (a turn's reply, a streamed chat completion)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus, SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from core.json_lines import one_line_json
from core.settings import settings

logger = logging.getLogger(__name__)


def event_json(data: Any) -> str:
    """An event's data as JSON on one line for every client (an SSE parser splits lines on CR and LF
    alone, a client reading the body's lines with str.splitlines on more: core/json_lines.py)."""
    return one_line_json(data)


# A reader that stops reading but keeps its connection open (a zero receive window) blocked the send
# for as long as it liked: the stream's own deadline and disconnect checks never ran, and its
# follower and status checks lived on. A send that cannot complete in this long ends the stream.
SEND_TIMEOUT_S = 30.0


class _SendTimedOut(TimeoutError):
    """A send this module bounded took longer than SEND_TIMEOUT_S."""


class _Stream(EventSourceResponse):
    """A stream whose reader stopped reading ends with one line in the log, not a traceback. Every
    send is bounded, the closing one and the headers too (sse-starlette bounds the events' only)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded(message: Message) -> None:
            try:
                with anyio.fail_after(SEND_TIMEOUT_S):
                    await send(message)
            except TimeoutError:
                raise _SendTimedOut from None

        try:
            await super().__call__(scope, receive, bounded)
        except (SendTimeoutError, _SendTimedOut):  # not a TimeoutError of the events' own
            logger.info("a stream's reader took nothing for %g s; the stream ended", SEND_TIMEOUT_S)


# The server's shutdown (SIGTERM, a rolling deploy): sse-starlette cancels a stream and ends its body
# cleanly, which a chat client reads as a whole reply. Each stream's own last frame says otherwise.
SHUTDOWN_GRACE_S = 1.0
CLOSE_WAIT_S = 5.0  # for a stream's generator to finish closing


async def _until_shutdown(
    events: AsyncIterable[Any], shutdown: anyio.Event, farewell: Any
) -> AsyncIterator[Any]:
    """`events` until the server shuts down, then `farewell` (the stream's resumable end). Each next
    event is awaited in a task of its own (raced against the shutdown); whatever ends the stream (the
    shutdown, the client gone, a send timed out), that task is cancelled and finished before `events`
    is closed, so the stream's own generator is closed at once, not left running under a close."""
    iterator = aiter(events)
    stop = asyncio.ensure_future(shutdown.wait())
    following: asyncio.Future[Any] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():  # shutting down: the turn goes on, its stream ends saying so
                yield farewell
                return
            done, following = following, None
            try:
                item = done.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        with anyio.move_on_after(CLOSE_WAIT_S, shield=True):  # the stream may be being cancelled itself
            if following is not None:  # done or not: what it holds is read, never left to the log
                following.cancel()
                with contextlib.suppress(BaseException):  # its cancellation, or what it raised
                    await following
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def shutting_down() -> bool:
    """Whether the server is shutting down (uvicorn took a SIGTERM or SIGINT), as sse-starlette tells
    it to the streams it then ends: its flag, or uvicorn's own where its patch did not take."""
    if AppStatus.should_exit:
        return True
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


def sse_response(events: AsyncIterable[Any], *, on_shutdown: Any = None) -> EventSourceResponse:
    """`events` as a text/event-stream, with pings every MLCHAT_STREAM_PING_S and SEND_TIMEOUT_S;
    `on_shutdown`, the frame sent last when the server shuts down while the stream is open."""
    shutdown = anyio.Event()
    body = events if on_shutdown is None else _until_shutdown(events, shutdown, on_shutdown)
    return _Stream(
        body,
        ping=max(1, int(settings.stream_ping_s)),
        send_timeout=SEND_TIMEOUT_S,
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )
