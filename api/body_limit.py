"""Reject request bodies over a size limit with a 413, however they are sent.

A declared Content-Length over the limit is refused before anything is read. A body without one
(chunked transfer encoding) streams through to the app as it arrives, counted: one byte over the
limit and the app's read raises BodyTooLarge, an HTTPException, which FastAPI re-raises instead of
its 400 "error parsing the body" and the app answers 413; nothing is buffered here, so a chunked
upload costs no more memory than a declared one. A path may have its own limit (card uploads are
larger than JSON requests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException

from api.openai_errors import error_body, openai_path, route_path

Scope = dict[str, Any]


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually streamed, exceed the limit."""

    def __init__(self, app: Any, max_bytes: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(route_path(scope), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await self._reply(send, 400, "Content-Length is not a number", scope)
                return
            if too_large:
                await self._reply(send, 413, f"request body over {limit} bytes", scope)
                return
        # Counted even under a declared length: a request that also says `Transfer-Encoding: chunked`
        # is framed by its chunks (h11 passes both headers on), however small its Content-Length.
        try:
            await self.app(scope, _counted(receive, limit), send)
        except BodyTooLarge as exc:  # raised where no exception handler answers it (not a route)
            await self._reply(send, exc.status_code, str(exc.detail), scope)

    async def _reply(self, send: Any, status: int, detail: str, scope: Scope) -> None:
        shaped = openai_path(route_path(scope))
        body = json.dumps(error_body(status, detail) if shaped else {"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """The streamed body passed the limit (a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


def _counted(receive: Any, limit: int) -> Any:
    """A receive() that passes the body through, raising BodyTooLarge once it passes `limit` bytes."""
    seen = 0

    async def counting() -> Any:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return counting
