"""`python -m worker.health`: the container health check of a worker (exit 0 healthy, 1 not).

It reads the worker's own metrics endpoint, which a thread of its own serves even while a batch
runs: healthy means `mlchat_engine_up 1`, so a worker whose engine died reports it at once (and is
already on its way out, see worker/lifecycle.py). With the endpoint off (MLCHAT_METRICS_PORT=0) it
falls back to a Celery ping of this host's worker.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

from core.settings import settings


def engine_up(port: int, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, why) from the worker's metrics endpoint on this host: the engine's gauge alone (a
    whole scrape reads the queue depths from the broker, and a broker that hangs would time the
    health check out and have every worker restarted, in-flight batches and all)."""
    url = f"http://127.0.0.1:{port}/metrics?name[]=mlchat_engine_up"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read().decode()
    except OSError as exc:
        return False, f"metrics endpoint unreachable: {exc}"
    for line in body.splitlines():
        if line.startswith("mlchat_engine_up "):
            up = float(line.split()[1]) == 1.0
            return up, "engine up" if up else "engine dead or not loaded"
    return False, "no mlchat_engine_up in the metrics"


def main() -> int:
    """Exit status for a container health check."""
    if settings.metrics_port:
        healthy, why = engine_up(settings.metrics_port)
    else:
        from tasks.app import app

        node = f"mlchat-{settings.model}@{socket.gethostname()}"
        healthy = bool(app.control.ping(destination=[node], timeout=5.0))
        why = "answers pings" if healthy else "no answer to a ping"
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
