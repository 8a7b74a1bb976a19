"""The server-sent-event responses of the API's streams (a turn's reply, a streamed chat completion)."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

from sse_starlette import EventSourceResponse

from core.settings import settings

# A reader that stops reading but keeps its connection open (a zero receive window) blocked the send
# for as long as it liked: the stream's own deadline and disconnect checks never ran, and its
# follower and status checks lived on. A send that cannot complete in this long ends the stream.
SEND_TIMEOUT_S = 30.0


def sse_response(events: AsyncIterable[Any]) -> EventSourceResponse:
    """`events` as a text/event-stream, with pings every MLCHAT_STREAM_PING_S and SEND_TIMEOUT_S."""
    return EventSourceResponse(events, ping=max(1, int(settings.stream_ping_s)), send_timeout=SEND_TIMEOUT_S)
