"""A real HTTP endpoint on loopback for the callback tests: what a game's receiver sees."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.callbacks import SIGNATURE_HEADER


@contextmanager
def receiving(answers: list[int] | None = None) -> Iterator[tuple[str, list[tuple[bytes, str]]]]:
    """An endpoint on loopback answering its POSTs with `answers` in turn (None: 204 to each); yields
    its URL and the (body, signature) of each POST it received."""
    received: list[tuple[bytes, str]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(
                (self.rfile.read(int(self.headers["content-length"])), self.headers[SIGNATURE_HEADER])
            )
            self.send_response(204 if answers is None else answers.pop(0))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()
