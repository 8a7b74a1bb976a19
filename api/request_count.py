"""Counting the API's requests by method, route and status (mlchat_ingest_requests)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import metrics

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestCount:
    """A plain ASGI middleware, not Starlette's BaseHTTPMiddleware (`@app.middleware("http")`): that
    one relays a streamed response through a memory stream of its own, so a stream's bounded send
    (api/sse.py) only reached that relay, and the relay's write to a reader that stopped reading
    held the connection and its buffers for as long as the reader kept it open (review)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "500"  # an exception no handler answered: the server's error page is a 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            # The method as a known one or "other": an HTTP parser that takes any token (h11) would
            # otherwise let each client's made-up method start a series of its own.
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            metrics.INGEST_REQUESTS.labels(method, getattr(route, "path", "unmatched"), status).inc()
